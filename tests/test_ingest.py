"""Ingest: every input ends in the images table or the rejects table, with a reason."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.ingest.decode import Rejection, decode_validate
from pipeline.ingest.stage import ingest_entries
from pipeline.storage import Storage
from schemas.config import IngestSection
from schemas.tables import IMAGES, RejectReason
from tests.helpers.config import run_config
from tests.helpers.images import (
    bomb_png_header,
    cmyk_jpeg,
    exif_rotated_jpeg,
    png16,
    scene_jpeg,
    write_bad_inputs,
)

LIMITS = IngestSection()


def test_good_jpeg_passes_through_untouched():
    data = scene_jpeg(11)
    row = decode_validate(data, "x.jpg", LIMITS)
    assert isinstance(row, dict)
    assert row["image"] == data and row["format"] == "JPEG" and json.loads(row["meta"]) == {}
    assert (row["width"], row["height"]) == (1600, 1200)
    assert row["uid"] == row["sha256"][:32] and len(row["uid"]) == 32
    assert 0 <= row["phash"] < 2**64 and 0 <= row["dhash"] < 2**64


def test_exif_rotation_is_applied_to_size_and_bytes():
    data = exif_rotated_jpeg(orientation=6)  # stored 1600x1200, displayed 1200x1600
    row = decode_validate(data, "r.jpg", LIMITS)
    assert (row["width"], row["height"]) == (1200, 1600)
    stored = Image.open(io.BytesIO(row["image"]))
    assert stored.size == (1200, 1600)  # plain PIL, ignoring EXIF, sees the oriented image
    assert stored.getexif().get(0x0112, 1) == 1
    meta = json.loads(row["meta"])
    assert meta["normalized"] == "exif orientation 6" and meta["source_n_bytes"] == len(data)
    assert row["sha256"] != __import__("hashlib").sha256(row["image"]).hexdigest()  # uid is of the original


def test_rotation_preserves_content():
    """Orientation 6 means rotate 90 degrees clockwise for display: compare with PIL's own transpose."""
    from PIL import ImageOps

    data = exif_rotated_jpeg(orientation=6)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L").resize((60, 80))
    row = decode_validate(data, "r.jpg", LIMITS)
    got = Image.open(io.BytesIO(row["image"])).convert("L").resize((60, 80))
    diff = sum(abs(a - b) for a, b in zip(expected.getdata(), got.getdata())) / (60 * 80)
    assert diff < 6


@pytest.mark.parametrize("maker, reason", [(cmyk_jpeg, "mode CMYK"), (png16, "mode I;16")])
def test_normalised_encodings_decode_to_rgb8(maker, reason):
    row = decode_validate(maker(), "n", LIMITS)
    assert json.loads(row["meta"])["normalized"] == reason
    img = Image.open(io.BytesIO(row["image"]))
    assert img.mode == "RGB" and img.size == (row["width"], row["height"])


def test_16bit_scaled_not_clipped():
    row = decode_validate(png16(), "d.png", LIMITS)
    arr = Image.open(io.BytesIO(row["image"])).convert("L")
    lo, hi = arr.getextrema()
    assert lo < 30 and hi > 220  # the 0..65535 gradient maps onto 0..255, not a white clip


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def test_alpha_png_composited_on_white():
    img = Image.new("RGBA", (1100, 1100), (255, 0, 0, 0))
    img.paste((200, 30, 30, 255), (300, 300, 800, 800))  # an opaque red square on a transparent ground
    row = decode_validate(_png(img), "a.png", LIMITS)
    meta = json.loads(row["meta"])
    assert meta["normalized"] == "mode RGBA" and "alpha_background" not in meta
    stored = Image.open(io.BytesIO(row["image"]))
    assert stored.getpixel((5, 5)) == (255, 255, 255) and stored.getpixel((550, 550)) == (200, 30, 30)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_uniform_images_are_blank(fmt):
    out = io.BytesIO()
    Image.new("RGB", (1600, 1200), (200, 180, 160)).save(out, fmt)
    rej = decode_validate(out.getvalue(), "plain", LIMITS)
    assert isinstance(rej, Rejection) and rej.reason is RejectReason.BLANK
    assert rej.uid and "near-uniform" in rej.detail and "thumbnail" in rej.detail


def test_blank_threshold_keeps_faint_content():
    """A gentle gradient and a small dark square on a plain ground are content, fine noise is not."""
    import numpy as np

    rng = np.random.default_rng(0)
    gradient = np.repeat(np.linspace(200, 190, 1600)[None, :, None], 1200, 0).repeat(3, 2).astype(np.uint8)
    assert isinstance(decode_validate(_png(Image.fromarray(gradient)), "g", LIMITS), dict)
    dot = Image.new("RGB", (1600, 1200), (240, 240, 240))
    dot.paste((20, 20, 20), (780, 580, 820, 620))
    assert isinstance(decode_validate(_png(dot), "d", LIMITS), dict)
    noise = np.clip(128 + rng.normal(0, 3, (1200, 1600, 3)), 0, 255).astype(np.uint8)
    assert decode_validate(_png(Image.fromarray(noise)), "n", LIMITS).reason is RejectReason.BLANK


def test_picture_only_in_alpha_is_flattened_on_black_not_rejected():
    """The wallpaper case: RGB uniformly white, the picture in the alpha channel. Over white it
    would be a white page (what a trainer's convert("RGB") of the stored bytes would see), so it is
    flattened over black, stored that way, and hashed and measured on exactly that."""
    import numpy as np

    alpha = np.zeros((1200, 1600), np.uint8)
    alpha[300:900, 400:1200] = 255
    rgba = np.dstack([np.full((1200, 1600, 3), 255, np.uint8), alpha])
    row = decode_validate(_png(Image.fromarray(rgba, "RGBA")), "wallpaper.png", LIMITS)
    assert isinstance(row, dict)
    assert json.loads(row["meta"])["alpha_background"] == "black"
    stored = Image.open(io.BytesIO(row["image"])).convert("RGB")
    assert stored.getpixel((10, 10)) == (0, 0, 0) and stored.getpixel((800, 600)) == (255, 255, 255)
    from dedupe.hashing import perceptual_hashes

    assert (row["phash"], row["dhash"], row["fine_sig"]) == perceptual_hashes(stored)

    clear = decode_validate(_png(Image.new("RGBA", (1600, 1200), (255, 0, 0, 0))), "clear.png", LIMITS)
    assert clear.reason is RejectReason.BLANK and "on white and on black" in clear.detail


def test_limits_come_from_config():
    assert isinstance(decode_validate(scene_jpeg(3, 800, 600), "s", IngestSection(min_side=512)), dict)
    rej = decode_validate(scene_jpeg(3), "s", IngestSection(max_pixels=1000))
    assert isinstance(rej, Rejection) and rej.reason is RejectReason.TOO_MANY_PIXELS
    assert decode_validate(bomb_png_header(), "b", LIMITS).reason is RejectReason.TOO_MANY_PIXELS


def test_ingest_entries_accounts_for_every_file(tmp_path):
    expected = write_bad_inputs(tmp_path / "bad")
    storage = Storage()
    entries = storage.list_files(str(tmp_path / "bad"))
    images, rejects = ingest_entries(entries, IngestSection(max_bytes=10**9), storage)
    assert images.schema.equals(IMAGES, check_metadata=False)
    assert images.num_rows + rejects.num_rows == len(expected)
    got = {r["source_uri"].rsplit("/", 1)[1]: r["reason"] for r in rejects.to_pylist()}
    assert got == {k: v for k, v in expected.items() if v is not None}
    accepted = {u.rsplit("/", 1)[1] for u in images["source_uri"].to_pylist()}
    assert accepted == {k for k, v in expected.items() if v is None}


def test_too_large_and_unreadable_files_are_rejected(tmp_path):
    from pipeline.storage import FileEntry

    big = tmp_path / "big.jpg"
    big.write_bytes(scene_jpeg(5))
    entries = [FileEntry(str(big), big.stat().st_size), FileEntry(str(tmp_path / "vanished.jpg"), 10)]
    images, rejects = ingest_entries(entries[:1], IngestSection(max_bytes=100), Storage())
    assert images.num_rows == 0
    assert rejects["reason"].to_pylist() == ["too_large_file"]
    images, rejects = ingest_entries(entries[1:], IngestSection(), Storage())
    assert rejects["reason"].to_pylist() == ["read_error"] and "vanished" in rejects["detail"][0].as_py()


def test_bad_input_folder_through_the_flow(build, tmp_path):
    """Acceptance: a folder of bad inputs gives a successful run; inputs = accepted + rejected."""
    expected = write_bad_inputs(tmp_path / "bad")
    (tmp_path / "bad" / "zz_copy_of_good.jpg").write_bytes((tmp_path / "bad" / "good.jpg").read_bytes())
    expected["zz_copy_of_good.jpg"] = "duplicate_exact"  # same bytes as good.jpg, which sorts after it
    expected["good.jpg"] = None
    cfg = run_config(tmp_path, "bad", ingest={"partition_size": 3}, shards={"max_samples": 2})
    dataset = build(cfg, run_id="bad-inputs")
    counts = dataset["counts"]
    accepted = sorted(k for k, v in expected.items() if v is None)
    assert counts["inputs"] == len(expected) == counts["samples"] + counts["rejected"]
    assert counts["samples"] == len(accepted)

    from pipeline.dataset_card import collect_rejects
    from pipeline.stage import make_context
    from schemas.config import parse_config

    table = collect_rejects(make_context(parse_config(cfg), "bad-inputs"))
    got = {r["source_uri"].rsplit("/", 1)[1]: r["reason"] for r in table.to_pylist()}
    assert got == {k: v for k, v in expected.items() if v is not None}
    assert all(r["detail"] for r in table.to_pylist())

    manifest = pq.read_table(tmp_path / "ds" / "manifest.parquet").to_pylist()
    assert sorted(m["source"].rsplit("/", 1)[1] for m in manifest) == accepted
    rotated = next(m for m in manifest if m["source"].endswith("rotated.jpg"))
    assert (rotated["width"], rotated["height"]) == (1200, 1600)


@pytest.mark.parametrize("fmt, offset", [("PNG", 29), ("WEBP", 12)])
def test_a_damaged_file_with_a_valid_signature_is_a_decode_error(fmt, offset):
    """A PNG whose header chunk fails its CRC (or a WebP with a broken chunk) announces its format:
    the reason is decode_error, and the detail does not contradict it."""
    out = io.BytesIO()
    Image.new("RGB", (1200, 1100), (10, 200, 30)).save(out, fmt)
    data = bytearray(out.getvalue())
    data[offset:offset + 4] = b"\xde\xad\xbe\xef"
    got = decode_validate(bytes(data), "broken", LIMITS)
    assert isinstance(got, Rejection) and got.reason == RejectReason.DECODE_ERROR, got
    assert fmt in got.detail and "not an image" not in got.detail
    text = decode_validate(b"plain text, not an image at all", "t.jpg", LIMITS)
    assert text.reason == RejectReason.NOT_AN_IMAGE


def test_an_exact_copy_is_not_decoded_again(monkeypatch):
    """Ingest hashes the bytes first: a copy of an input this process already decoded (the same
    wallpaper under two names) gets the same row, its own source URI, and no second decode."""
    from pipeline.ingest import decode

    data = scene_jpeg(5)
    first = decode_validate(data, "a/one.jpg", LIMITS)
    hits = decode.EXACT_COPIES.hits
    opened = []
    real_open = decode.Image.open
    monkeypatch.setattr(decode.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    copy = decode_validate(bytes(data), "b/two.jpg", LIMITS)
    assert decode.EXACT_COPIES.hits == hits + 1 and opened == []
    assert copy["source_uri"] == "b/two.jpg" and copy["image"] == data
    assert {k: v for k, v in copy.items() if k != "source_uri"} == {k: v for k, v in first.items() if k != "source_uri"}
    other = decode_validate(data, "c/three.jpg", LIMITS.model_copy(update={"thumb_side": 128}))  # other limits: decoded
    assert decode.EXACT_COPIES.hits == hits + 1 and len(other["thumb"]) < len(first["thumb"])
