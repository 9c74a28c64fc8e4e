"""Near-duplicate images: edits of one image are found, images that differ in a small detail are not
merged, distinct images never are, and a run skips what an earlier version already published."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from PIL import ImageEnhance

from dedupe.clusters import near_duplicates
from dedupe.regions import kept_boxes
from pipeline.ingest.decode import decode_validate
from pipeline.partitions import part_name
from pipeline.synthetic import encode, generate_scene
from schemas.config import IngestSection
from schemas.tables import IMAGES, rows_to_table
from tests.helpers.config import run_config


def _variants(img) -> dict[str, bytes]:
    w, h = img.size
    return {
        "orig.jpg": encode(img, "JPEG", quality=90),
        "q50.jpg": encode(img, "JPEG", quality=50),
        "q95.jpg": encode(img, "JPEG", quality=95),
        "half.jpg": encode(img.resize((w // 2, h // 2)), "JPEG", quality=85),
        "same.png": encode(img, "PNG"),
        "bright.jpg": encode(ImageEnhance.Brightness(img).enhance(1.1), "JPEG", quality=90),
    }


def test_edits_are_near_duplicates_and_small_differences_are_not(build, tmp_path):
    (tmp_path / "img").mkdir()
    for s in range(3):
        img, _ = generate_scene(800 + s, 2400, 1600, n_objects=3, grain=4.0 * s)
        for name, data in _variants(img).items():
            (tmp_path / "img" / f"s{s}-{name}").write_bytes(data)
        other, _ = generate_scene(800 + s, 2400, 1600, n_objects=3, grain=4.0 * s, object_seed=900 + s)  # same layout
        (tmp_path / "img" / f"s{s}-other.jpg").write_bytes(encode(other, "JPEG", quality=90))
    cfg = run_config(tmp_path, ingest={"min_side": 512}, regions={"method": "none"}, shards={"keep_empty": True},
                     dedupe={"distributed_min": 0})  # the search as Ray tasks split by band set, as on a cluster
    dataset = build(cfg, run_id="near")
    assert dataset["counts"]["rejected_by_reason"] == {"duplicate_near": 3 * 5}
    assert dataset["counts"]["samples"] == 3 * 2  # one of each variant group, plus each same-layout image
    kept = {r["source"].rsplit("/", 1)[1] for r in pq.read_table(tmp_path / "ds" / "manifest.parquet").to_pylist()}
    assert {f"s{s}-other.jpg" for s in range(3)} <= kept
    assert not any("half" in k for k in kept)  # the largest member of a cluster is kept
    dedupe = pq.read_table(tmp_path / "work" / "near" / "dedupe" / part_name(0)).to_pylist()
    assert len(dedupe) == 3 * 7 and sum(r["kept"] for r in dedupe) == 6
    assert all(r["duplicate_of"] for r in dedupe if not r["kept"])


def test_no_false_merges_among_200_distinct_images():
    limits = IngestSection(min_side=256)
    rows = []
    for seed in range(200):
        w, h = [(1024, 768), (768, 1024), (960, 640)][seed % 3]
        img, _ = generate_scene(5000 + seed, w, h, n_objects=int(seed % 4) + 1, grain=float(seed % 3) * 4)
        rows.append(decode_validate(encode(img, "JPEG", quality=85), f"mem://{seed}", limits))
    dedupe, rejects = near_duplicates(rows_to_table(rows, IMAGES), None, radius=4, threshold=0.8)
    assert rejects.num_rows == 0 and all(dedupe["kept"].to_pylist())


def test_a_second_run_skips_what_a_published_version_holds(build, tmp_path):
    (tmp_path / "img").mkdir()
    for s in range(4):
        (tmp_path / "img" / f"{s}.jpg").write_bytes(encode(generate_scene(850 + s, 1600, 1200, n_objects=2)[0], "JPEG", quality=90))
    name = str(tmp_path / "published")

    def cfg(work: str, output: str, publish: bool = True) -> dict:
        return run_config(tmp_path, work=work, output=output, regions={"method": "none"}, shards={"keep_empty": True},
                          dedupe={"index": name}, publish={"to": name if publish else None})

    first = build(cfg("w1", "v1"), run_id="v1")
    assert first["counts"]["samples"] == 4 and first["published"]["version"] == "v1"
    assert (tmp_path / "published" / "v1" / "hashes.parquet").exists()

    # A re-encoded copy of one published image and one new image arrive with the old ones. A build
    # that is not published leaves the index as it was: the next build still builds new.jpg.
    again = generate_scene(850, 1600, 1200, n_objects=2)[0]
    (tmp_path / "img" / "0-reencoded.png").write_bytes(encode(again, "PNG"))
    (tmp_path / "img" / "new.jpg").write_bytes(encode(generate_scene(870, 1600, 1200, n_objects=2)[0]))
    unpublished = build(cfg("w0", "v0", publish=False), run_id="unpublished")
    assert unpublished["counts"]["samples"] == 1
    second = build(cfg("w2", "v2"), run_id="v2")
    assert second["counts"]["samples"] == 1 and second["published"]["version"] == "v2"
    assert second["counts"]["rejected_by_reason"] == {"duplicate_published": 5}
    assert json.loads((tmp_path / "w2" / "v2" / "run.json").read_text())["hashes"] == 1
    third = build(cfg("w3", "v3"), run_id="v3")  # nothing new: nothing published
    assert third["counts"]["samples"] == 0 and third["published"]["unchanged"]


def test_box_dedupe_by_overlap_and_caption():
    boxes = [[0, 0, 100, 100], [5, 5, 100, 100], [200, 0, 300, 100], [400, 0, 500, 100]]
    assert kept_boxes(boxes, None, 0.7, 0.9) == [0, 2, 3]
    texts = ["a red sign on a wall", "x", "A red sign on a wall.", "a blue door"]
    assert kept_boxes(boxes, texts, 0.7, 0.9) == [0, 3]
    assert kept_boxes(boxes, ["", "", "", ""], 0.7, 0.9) == [0, 2, 3]
