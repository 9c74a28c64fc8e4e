"""The PS3 conformance checker (tests/helpers/ps3_conformance.py) on hand-made datasets: it passes a good one
and names each kind of sample PS3's loader would crash on or train on nothing with."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.ps3_conformance import (
    DatasetRules,
    LoaderArgs,
    dataset_rules,
    dataset_signature,
    filter_keywords,
    find_datasets,
    ps3_problems,
    random_resized_crop,
    selection_map_cells,
    sentence_masking_outcomes,
    sentence_merging,
    trains_on_text,
    transform_box,
)

# These datasets are broken on purpose: the session-wide check in conftest.py must not judge them.
pytestmark = pytest.mark.no_ps3_conformance

CAPTIONED = {"captioner": {"backend": "openai", "global_caption": True}, "shards": {"layout": "paired", "keep_empty": False}}
BOXES_ONLY = {"captioner": {"backend": "none"}, "shards": {"layout": "paired", "keep_empty": False}}


def _image(width: int = 64, height: int = 48, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(out, fmt)
    return out.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _good(key: str) -> dict:
    return {"text": ["A red kite over the trees.", "A wooden bench. It is empty."], "box": [[8, 8, 30, 30], [30, 20, 60, 44]],
            "global_text": "A park on a sunny day.", "type": "natural"}


def _dataset(root: Path, shards: list[list[tuple[str, dict | bytes]]], config: dict | None = CAPTIONED,
             images: dict[str, bytes] | None = None, text_keys: dict[str, str] | None = None) -> Path:
    """A paired dataset: shards of (key, sample JSON) -> image/image_N.tar + text_box/text_box_N.tar."""
    images, text_keys = images or {}, text_keys or {}
    for i, samples in enumerate(shards):
        _tar(root / "image" / f"image_{i:06d}.tar", [(f"{k}.jpg", images.get(k, _image())) for k, _ in samples])
        _tar(root / "text_box" / f"text_box_{i:06d}.tar",
             [(f"{text_keys.get(k, k)}.json", s if isinstance(s, bytes) else json.dumps(s).encode()) for k, s in samples])
        for folder in ("image", "text_box"):
            sizes = root / folder / "sizes.json"
            counts = json.loads(sizes.read_text()) if sizes.exists() else {}
            sizes.write_text(json.dumps({**counts, f"{folder}_{i:06d}.tar": len(samples)}))
    (root / "dataset.json").write_text(json.dumps({"name": "hand-made"} | ({"config": config} if config else {})))
    return root


def _keys(n: int, start: int = 0) -> list[str]:
    return [f"{i:032x}" for i in range(start, start + n)]


def _one(root: Path, sample: dict | bytes, config: dict | None = CAPTIONED, **kw) -> list[str]:
    keys = _keys(3)
    shard = [(keys[0], _good(keys[0])), (keys[1], sample), (keys[2], _good(keys[2]))]
    return ps3_problems(_dataset(root, [shard], config, **kw), seeds=range(20))


def _only_about(problems: list[str], key: str) -> bool:
    return bool(problems) and all(key in p for p in problems)


def test_good_dataset_passes(tmp_path):
    keys = _keys(5)
    ds = _dataset(tmp_path / "ds", [[(k, _good(k)) for k in keys[:3]], [(k, _good(k)) for k in keys[3:]]])
    assert ps3_problems(ds, seeds=range(50)) == []
    assert dataset_rules(ds) == DatasetRules(captioned=True, need_global=True, keep_empty=False, layout="paired", from_config=True)


def test_png_and_webp_images_and_captions_without_global_when_not_asked_pass(tmp_path):
    keys = _keys(2)
    no_global = {"captioner": {"backend": "vllm", "global_caption": False}, "shards": {"keep_empty": False}}
    samples = [(k, {kk: v for kk, v in _good(k).items() if kk != "global_text"}) for k in keys]
    ds = _dataset(tmp_path / "ds", [samples], no_global, images={keys[0]: _image(fmt="PNG"), keys[1]: _image(fmt="WEBP")})
    assert ps3_problems(ds) == []


def test_sample_with_no_texts_fails(tmp_path):
    key = _keys(3)[1]
    problems = _one(tmp_path / "ds", {"text": [], "box": [], "global_text": "A park.", "type": "natural"})
    assert _only_about(problems, key)
    assert any("contract: no box with a text" in p for p in problems)
    # PS3 draws the local view with p = 0.75 and then divides by zero in sentence_merging.
    assert any("ZeroDivisionError in sentence_merging" in p and "seeds)" in p for p in problems)


def test_sample_without_global_text_fails(tmp_path):
    key = _keys(3)[1]
    sample = {k: v for k, v in _good(key).items() if k != "global_text"}
    problems = _one(tmp_path / "ds", sample)
    assert _only_about(problems, key) and any("contract: no global_text" in p for p in problems), problems


def test_null_global_text_crashes_when_drawn(tmp_path):
    problems = _one(tmp_path / "ds", {**_good("x"), "global_text": None})
    assert any("crash: global_text is None" in p for p in problems)
    assert any("crash: a global draw of a text that is not a string" in p for p in problems)


def test_key_mismatch_between_the_tars_fails(tmp_path):
    keys = _keys(3)
    other = "f" * 32
    ds = _dataset(tmp_path / "ds", [[(k, _good(k)) for k in keys]], text_keys={keys[1]: other})
    problems = ps3_problems(ds)
    assert any(f"image key {keys[1]} vs text_box key {other}" in p for p in problems), problems


def test_sample_count_mismatch_and_missing_shard_fail(tmp_path):
    keys = _keys(3)
    ds = _dataset(tmp_path / "ds", [[(k, _good(k)) for k in keys]])
    _tar(ds / "text_box" / "text_box_000000.tar", [(f"{k}.json", json.dumps(_good(k)).encode()) for k in keys[:2]])
    _tar(ds / "image" / "image_000001.tar", [(f"{keys[0]}.jpg", _image())])
    problems = ps3_problems(ds)
    assert any("3 image samples vs 2 text_box samples" in p for p in problems)
    assert any("sizes.json says 3 samples, the tar holds 2" in p for p in problems)
    assert any("image/image_000001.tar: pairing: shard has no partner" in p for p in problems), problems


def test_box_outside_the_image_fails(tmp_path):
    key = _keys(3)[1]
    problems = _one(tmp_path / "ds", {**_good(key), "box": [[8, 8, 30, 30], [30, 20, 70, 44]]})  # the image is 64 wide
    assert _only_about(problems, key) and any("box 1 [30, 20, 70, 44] is not x1<x2, y1<y2 inside the stored 64x48" in p
                                              for p in problems), problems


def test_box_and_text_counts_must_match(tmp_path):
    problems = _one(tmp_path / "ds", {**_good("x"), "box": [[8, 8, 30, 30]]})
    assert any("crash: 2 texts for 1 boxes" in p for p in problems)
    assert any("IndexError" in p for p in problems)


def test_image_that_does_not_open_and_bad_json_fail(tmp_path):
    keys = _keys(3)
    ds = _dataset(tmp_path / "a", [[(k, _good(k)) for k in keys]], images={keys[1]: b"not an image"})
    assert any("crash: image does not open with PIL" in p and keys[1] in p for p in ps3_problems(ds))
    assert any("crash: text_box JSON does not decode" in p for p in _one(tmp_path / "b", b"{not json"))


def test_captions_that_clean_to_nothing_fail(tmp_path):
    # A trailing space after the last full stop leaves an empty last "sentence" sentence_masking can pick alone.
    problems = _one(tmp_path / "a", {**_good("x"), "text": ["A red kite. ", "A wooden bench."]})
    assert any("nothing: text 0 'A red kite. ' can be blank" in p for p in problems), problems
    problems = _one(tmp_path / "b", {**_good("x"), "text": ["The image is a close-up of", "..."]})
    assert any("no box caption survives PS3's clean-up" in p for p in problems), problems
    assert any("nothing: a local draw's caption is blank" in p for p in problems)
    problems = _one(tmp_path / "c", {**_good("x"), "text": ["[Error] No caption found!", "A bench."]})
    assert any("error sentinel" in p for p in problems)


def test_box_cut_away_by_the_crop_fails(tmp_path):
    # 10:1 is wider than RandomResizedCrop's ratio range: every try fails, and its fallback is the
    # central 4:3 crop (133 of 1000 pixels), so a box at the left edge is never in the crop.
    keys = _keys(1)
    sample = {"text": ["A lamp post."], "box": [[0, 10, 100, 90]], "global_text": "A street.", "type": "natural"}
    ds = _dataset(tmp_path / "ds", [[(keys[0], sample)]], images={keys[0]: _image(1000, 100)})
    problems = ps3_problems(ds, seeds=range(10))
    assert any("box lies outside the resized crop" in p and "(in " in p for p in problems), problems


def test_boxes_only_dataset_passes_with_empty_texts_and_fails_without_boxes(tmp_path):
    keys = _keys(3)
    boxes_only = [(k, {"text": ["", ""], "box": [[8, 8, 30, 30], [30, 20, 60, 44]], "type": "natural"}) for k in keys]
    ds = _dataset(tmp_path / "a", [boxes_only], BOXES_ONLY)
    assert ps3_problems(ds) == []
    assert dataset_rules(ds).captioned is False and dataset_rules(ds).need_global is False
    boxes_only[1] = (keys[1], {"text": [], "box": [], "type": "natural"})
    problems = ps3_problems(_dataset(tmp_path / "b", [boxes_only], BOXES_ONLY))
    assert _only_about(problems, keys[1]) and any("contract: no box with a text" in p for p in problems)


def test_keep_empty_dataset_allows_untrainable_samples_but_not_broken_pairing(tmp_path):
    keep = {**CAPTIONED, "shards": {"layout": "paired", "keep_empty": True}}
    keys = _keys(3)
    samples = [(keys[0], _good(keys[0])), (keys[1], {"text": [], "box": [], "type": "natural"}), (keys[2], _good(keys[2]))]
    assert ps3_problems(_dataset(tmp_path / "a", [samples], keep)) == []
    ds = _dataset(tmp_path / "b", [samples], keep, text_keys={keys[2]: "e" * 32})
    assert any("pairing: image key" in p for p in ps3_problems(ds))


def test_keep_empty_waives_boxes_the_crop_cuts_away_but_not_boxes_outside_the_image(tmp_path):
    keep = {**CAPTIONED, "shards": {"layout": "paired", "keep_empty": True}}
    keys = _keys(1)
    sample = {"text": ["A lamp post."], "box": [[0, 10, 100, 90]], "type": "natural"}
    ds = _dataset(tmp_path / "a", [[(keys[0], sample)]], keep, images={keys[0]: _image(1000, 100)})
    assert ps3_problems(ds) == []
    sample["box"] = [[0, 10, 100, 190]]
    ds = _dataset(tmp_path / "b", [[(keys[0], sample)]], keep, images={keys[0]: _image(1000, 100)})
    assert any("geometry: box 0" in p for p in ps3_problems(ds))


def test_combined_layout(tmp_path):
    keys = _keys(2)
    root = tmp_path / "ds"
    _tar(root / "combined" / "shard_000000.tar",
         [m for k in keys for m in ((f"{k}.jpg", _image()), (f"{k}.json", json.dumps(_good(k)).encode()))])
    (root / "dataset.json").write_text(json.dumps({"config": {**CAPTIONED, "shards": {"layout": "combined"}}}))
    assert dataset_rules(root).layout == "combined" and ps3_problems(root) == []
    _tar(root / "combined" / "shard_000000.tar", [(f"{keys[0]}.jpg", _image()), (f"{keys[1]}.json", json.dumps(_good("x")).encode())])
    assert len([p for p in ps3_problems(root) if "not one image and one .json" in p]) == 2


def test_hand_made_folder_without_config_gets_strict_rules(tmp_path):
    keys = _keys(1)
    ds = _dataset(tmp_path / "ds", [[(keys[0], {"text": ["A kite."], "box": [[1, 1, 9, 9]], "type": "natural"})]], config=None)
    rules = dataset_rules(ds)
    assert rules.from_config is False and rules.need_global and not rules.keep_empty
    assert any("no global_text" in p for p in ps3_problems(ds))
    # A partial config written by a test is not the build's (which records every section).
    (ds / "dataset.json").write_text(json.dumps({"config": {"run": {}, "shards": {"keep_empty": True}}}))
    assert dataset_rules(ds).from_config is False and dataset_rules(ds).keep_empty is False


def test_text_rules_restated_from_ps3():
    assert filter_keywords("The image is a close-up of a kite. There is no visible text.") == " a kite."
    assert filter_keywords("No visible text here") == "No visible text here"  # a single sentence stays
    assert sentence_masking_outcomes("A. B. C. D.") == {"A.", "A. B.", "A. B. C.", "A. B. C. D.", "B.", "B. C.", "B. C. D.",
                                                        "C.", "C. D."}
    with pytest.raises(ZeroDivisionError):
        sentence_merging([], random.Random(0))
    assert sentence_merging(["A. B.", "C."], random.Random(0)).count(".") == 1  # 3 sentences // 2 texts
    assert trains_on_text("A kite.", True) and not trains_on_text("...", True) and not trains_on_text("A kite. ", True)


def test_box_transform_matches_torchvision():
    """Our re-statement of the box path against torchvision's own resized crop of an int64 XYXY box."""
    why = "torch and torchvision are part of the test install (make install); a bare environment without them skips this one check"
    torch = pytest.importorskip("torch", reason=why)
    tv_tensors = pytest.importorskip("torchvision.tv_tensors", reason=why)
    F = pytest.importorskip("torchvision.transforms.v2.functional", reason=why)
    rng = random.Random(1)
    size = 1512
    for _ in range(200):
        width, height = rng.randint(200, 4000), rng.randint(200, 4000)
        top, left, h, w = random_resized_crop(width, height, rng, (0.9, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        x1, y1 = rng.randint(0, width - 1), rng.randint(0, height - 1)
        box = [x1, y1, rng.randint(x1 + 1, width), rng.randint(y1 + 1, height)]
        theirs = F.resized_crop(tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=(height, width)), top, left, h, w, [size, size])
        ours, _ = transform_box(box, (top, left, h, w), size)
        assert list(ours) == theirs.squeeze(0).tolist(), (box, (top, left, h, w))
        # PS3's map: rows floor(y1):ceil(y2)+1, columns floor(x1):ceil(x2)+1 of a size x size zero map.
        m = torch.zeros(size, size)
        b = theirs.squeeze(0)
        m[int(b[1]):int(b[3]) + 1, int(b[0]):int(b[2]) + 1] = 1
        assert (selection_map_cells([ours], size) > 0) == bool(m.any())


def test_finding_datasets_and_their_signature(tmp_path):
    keys = _keys(1)
    ds = _dataset(tmp_path / "run" / "out" / "ds", [[(keys[0], _good(keys[0]))]])
    (tmp_path / "run" / "work").mkdir()
    assert find_datasets(tmp_path) == [ds]
    before = dataset_signature(ds)
    _tar(ds / "text_box" / "text_box_000000.tar", [(f"{keys[0]}.json", b"{}" * 300)])
    assert dataset_signature(ds) != before


def test_default_loader_args_are_ps3s_scripts():
    args = LoaderArgs()
    assert (args.use_global_caption, args.global_caption_prob, args.sample_n_box_each_image, args.sentence_masking) == (True, 0.25, 1, True)
