"""Region proposals: the PS3 score, its vectorised form, box contracts, the proposers, and the stage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.partitions import read_tables
from pipeline.regions.boxes import (
    box_sums,
    candidate_grid,
    select_non_overlapping,
    summed_area,
)
from pipeline.regions.proposers import make_proposer, propose_safely
from pipeline.regions.salient import label_weights, stack_weights
from pipeline.regions.tiles import pyramid_tiles
from dedupe.regions import iou
from pipeline.dataset_card import dataset_statistics
from pipeline.shards.stage import SampleRules, always_cropped_in, build_sample, sample_boxes
from pipeline.storage import Storage
from pipeline.synthetic import encode, generate_document, generate_scene
from schemas.config import RegionsSection, ShardsSection
from schemas.sample import validate_sample_json
from schemas.tables import REGION_STATUS, REGIONS
from tests.helpers.config import run_config


def _formula(masks: list[np.ndarray], box, pixel_area: float, image_area: float, floor: float) -> float:
    """DESIGN.md's score, mask by mask: sum of A_img / max(A_m, floor) * A(m ∩ box) / A(m)."""
    x1, y1, x2, y2 = box
    total = 0.0
    for m in masks:
        a_m = m.sum() * pixel_area
        inside = m[y1:y2, x1:x2].sum() * pixel_area
        total += image_area / max(a_m, floor) * inside / a_m
    return total


def test_summed_area_score_equals_the_formula():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (40, 60))
    labels[10:14, 20:23] = 6  # one small mask
    boxes = candidate_grid(60, 40, 0.5, 0.25)
    pixel_area, image_area, floor = 4.0, 60 * 40 * 4.0, 30.0
    fast = box_sums(summed_area(label_weights(labels, pixel_area, image_area, floor, 1)), boxes, 1.0, 1.0)
    masks = [labels == v for v in range(7)]
    slow = [_formula(masks, b, pixel_area, image_area, floor) for b in boxes]
    np.testing.assert_allclose(fast, slow, rtol=1e-9)

    # Overlapping masks (SAM's kind) go through the same map.
    stack = np.stack([labels == 6, labels < 2, np.ones_like(labels, bool)])
    fast = box_sums(summed_area(stack_weights(stack, pixel_area, image_area, floor, 1)), boxes, 1.0, 1.0)
    np.testing.assert_allclose(fast, [_formula(list(stack), b, pixel_area, image_area, floor) for b in boxes], rtol=1e-9)


def test_candidate_grid_shapes_and_bounds():
    boxes = candidate_grid(1000, 500, 0.2, 0.5)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert {(int(a), int(b)) for a, b in zip(w, h)} == {(100, 100), (122, 82), (82, 122)}  # same area, 1:1, 1.5:1, 1:1.5
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 1000).all() and (boxes[:, 3] <= 500).all()
    assert boxes[:, 2].max() == 1000 and boxes[:, 3].max() == 500  # the far edges are covered


def test_selection_is_top_k_without_overlap():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [10, 0, 20, 10], [30, 30, 40, 40], [0, 10, 10, 20]])
    scores = np.array([9.0, 8.0, 7.0, 1.0, 0.5])
    assert select_non_overlapping(boxes, scores, k=3).tolist() == [0, 2, 3]  # 1 overlaps 0; touching 2 does not
    assert select_non_overlapping(boxes, scores, k=5, min_score=2.0).tolist() == [0, 2]


def _scene_set(n: int):
    sizes = [(2048, 1536), (3840, 2160), (2160, 3840), (2560, 1440), (3000, 2000), (4096, 3072)]
    for seed in range(n):
        rng = np.random.default_rng(1000 + seed)
        w, h = sizes[seed % len(sizes)]
        img, objects = generate_scene(1000 + seed, w, h, n_objects=int(rng.integers(2, 5)), grain=float(rng.choice([0.0, 4.0, 8.0])))
        yield encode(img, "JPEG", quality=90), w, h, objects


def test_top4_boxes_cover_planted_objects():
    """Acceptance: over 60 scenes of 2K-4K with 2-4 small detailed objects each, at least 90% of
    planted objects have their centre inside one of the top-4 boxes."""
    proposer = make_proposer(RegionsSection())
    hit = total = 0
    misses = []
    for data, w, h, objects in _scene_set(60):
        p = proposer(data, w, h)
        assert len(p.boxes) <= 4 and p.boxes.dtype.kind == "i"
        for o in objects:
            cx, cy = o.centre
            total += 1
            if any(x1 <= cx < x2 and y1 <= cy < y2 for x1, y1, x2, y2 in p.boxes.tolist()):
                hit += 1
            else:
                misses.append((w, h, o.kind))
    assert total >= 150
    assert hit / total >= 0.90, f"{hit}/{total} planted objects covered; missed {misses}"


def test_plain_small_and_broken_images_get_zero_boxes_with_a_reason():
    proposer = make_proposer(RegionsSection())
    plain = encode(Image.new("RGB", (2048, 1536), (90, 120, 150)))
    p = proposer(plain, 2048, 1536)
    assert len(p.boxes) == 0 and p.reason == "too_plain" and "min_score" in p.detail

    small = encode(Image.new("RGB", (120, 90), (1, 2, 3)))
    p = proposer(small, 120, 90)
    assert len(p.boxes) == 0 and p.reason == "too_small"

    p = propose_safely(proposer, b"\xff\xd8 not really a jpeg", 2048, 1536)
    assert len(p.boxes) == 0 and p.reason == "error" and p.detail


def test_boxes_are_in_original_pixels_for_every_format():
    img, objects = generate_scene(5, 2400, 1600, n_objects=1)
    proposer = make_proposer(RegionsSection(k=1))
    for fmt in ("JPEG", "PNG", "WEBP"):
        (box,) = proposer(encode(img, fmt), 2400, 1600).boxes.tolist()
        cx, cy = objects[0].centre
        assert box[0] <= cx < box[2] and box[1] <= cy < box[3], fmt
        assert all(isinstance(v, int) for v in box)


def test_pyramid_tiles():
    boxes, scales = pyramid_tiles(3840, 2160, 512, [1.0, 0.75, 0.5, 0.25])
    sides = {round(s, 2): set((boxes[scales == s][:, 2] - boxes[scales == s][:, 0]).tolist()) for s in set(scales.tolist())}
    assert sides == {1.0: {512}, 0.75: {683}, 0.5: {1024}, 0.25: {2048}}
    for s in (1.0, 0.75, 0.5, 0.25):  # every scale covers the whole image
        cover = np.zeros((2160, 3840), bool)
        for x1, y1, x2, y2 in boxes[scales == s]:
            cover[y1:y2, x1:x2] = True
        assert cover.all()
    assert len(boxes[scales == 1.0]) == 8 * 5
    boxes, _ = pyramid_tiles(1200, 1000, 512, [1.0, 0.25])  # 2048 px tiles do not fit: scale skipped
    assert (boxes[:, 2] - boxes[:, 0] == 512).all()
    proposer = make_proposer(RegionsSection(method="tiles"))
    p = proposer(encode(Image.new("RGB", (300, 300))), 300, 300)
    assert len(p.boxes) == 0 and p.reason == "too_small"


def test_ocr_finds_the_text_lines_of_a_page():
    pytest.importorskip("rapidocr", reason="the `ocr` extra is part of the test install")
    page, lines = generate_document(3, 1700, 2200, n_lines=12)
    proposer = make_proposer(RegionsSection(method="ocr"))
    p = proposer(encode(page, "PNG"), 1700, 2200)
    found = 0
    for line in lines:
        lx1, ly1, lx2, ly2 = line.box
        for x1, y1, x2, y2 in p.boxes.tolist():
            inter = max(0, min(x2, lx2) - max(x1, lx1)) * max(0, min(y2, ly2) - max(y1, ly1))
            union = (x2 - x1) * (y2 - y1) + (lx2 - lx1) * (ly2 - ly1) - inter
            if inter / union > 0.5:
                found += 1
                break
    assert found >= len(lines) - 1, (found, len(lines), p.boxes.tolist())
    blank = make_proposer(RegionsSection(method="ocr"))(encode(Image.new("RGB", (1200, 1600), "white"), "PNG"), 1200, 1600)
    assert len(blank.boxes) == 0 and blank.reason == "no_text"


# -- the stage inside the real flow ------------------------------------------------------------
@pytest.fixture(scope="module")
def regions_run(ray_local, prefect_harness, tmp_path_factory):
    from flows.build import build_dataset

    root = tmp_path_factory.mktemp("regions")
    (root / "img").mkdir()
    planted = {}
    for i in range(5):
        img, objects = generate_scene(300 + i, 2048 + 256 * i, 1536, n_objects=3)
        (root / "img" / f"s{i}.jpg").write_bytes(encode(img))
        planted[f"s{i}.jpg"] = objects
    (root / "img" / "copy.jpg").write_bytes((root / "img" / "s0.jpg").read_bytes())  # exact duplicate
    (root / "img" / "plain.png").write_bytes(encode(Image.new("RGB", (1600, 1200), (200, 180, 160)), "PNG"))  # blank at ingest
    # Big enough for ingest, too small for a box (a fifth of 150 px is under regions.min_box_side).
    (root / "img" / "small.jpg").write_bytes(encode(generate_scene(399, 200, 150, n_objects=1)[0]))
    cfg = run_config(root, ingest={"partition_size": 3, "min_side": 100})
    dataset = build_dataset(cfg, run_id="r1", progress=False)
    return root, cfg, dataset, planted


def _samples(ds):
    import webdataset as wds

    sizes = json.loads((ds / "text_box" / "sizes.json").read_text())
    return {s["__key__"]: validate_sample_json(s["json"]) for s in wds.WebDataset([str(ds / "text_box" / n) for n in sorted(sizes)],
                                                                                   shardshuffle=False, empty_check=False)}


def test_stage_writes_boxes_to_tables_and_shards(regions_run):
    root, _, dataset, planted = regions_run
    regions = read_tables(Storage(), str(root / "work" / "r1" / "regions"), "part", REGIONS).to_pylist()
    status = read_tables(Storage(), str(root / "work" / "r1" / "regions"), "status", REGION_STATUS).to_pylist()
    assert len(status) == 6  # the duplicate was skipped: no work spent on it
    by_uid = {}
    for r in regions:
        by_uid.setdefault(r["uid"], []).append(r["box"])
    manifest = pq.read_table(root / "ds" / "manifest.parquet").to_pylist()
    samples = _samples(root / "ds")
    dropped = visible = covered = 0
    for row in manifest:
        sample = samples[row["key"]]
        # Boxes PS3's crop could cut away entirely are left out (the 3072x1536 scene: outside its central 4:3).
        seen = always_cropped_in(row["width"], row["height"])
        proposed = by_uid.get(row["uid"], [])
        assert sample.box == [b for b in proposed if iou(b, seen) > 0] and len(sample.box) == row["boxes"]
        dropped += len(proposed) - len(sample.box)
        assert sample.text == [""] * len(sample.box)
        sample.check_inside(row["width"], row["height"])
        name = row["source"].rsplit("/", 1)[1]
        if name in planted:  # the planted objects PS3 can see are inside a box
            assert 1 <= len(proposed) <= 4
            for o in planted[name]:
                cx, cy = o.centre
                if seen[0] + 160 <= cx < seen[2] - 160:
                    visible += 1
                    covered += any(x1 <= cx < x2 and y1 <= cy < y2 for x1, y1, x2, y2 in sample.box)
    assert visible >= 6 and covered >= visible - 1, f"{covered}/{visible} visible planted objects in a box"  # the rate: test_top4_boxes_cover_planted_objects
    small = next(s for s in status if s["boxes"] == 0)
    assert small["reason"] == "too_small"
    # An image without boxes is no sample (PS3's loader cannot train on it): a reject saying why.
    assert dataset["counts"]["rejected_by_reason"] == {"blank": 1, "duplicate_exact": 1, "no_boxes": 1}
    rejects = {r["source_uri"].rsplit("/", 1)[1]: r for r in pq.read_table(root / "ds" / "rejects.parquet").to_pylist()}
    assert rejects["small.jpg"]["reason"] == "no_boxes" and "too_small" in rejects["small.jpg"]["detail"]
    assert rejects["plain.png"]["reason"] == "blank" and rejects["plain.png"]["stage"] == "ingest"
    stats = dataset["statistics"]
    assert stats["no_boxes_by_reason"] == {}
    assert stats["boxes_per_image"]["max"] <= 4 and stats["boxes_per_image"]["min"] >= 1
    assert 0.05 < stats["box_width_fraction"]["median"] <= 0.6  # the largest of regions.distinct.box_scales
    # The statistics describe the samples' boxes (test_box_statistics_count_the_samples_boxes...).
    in_samples = sum(row["boxes"] for row in manifest)
    assert sum(stats["box_side_fraction_by_size"].values()) == in_samples
    assert sum(int(n) * c for n, c in stats["images_by_box_count"].items()) == in_samples
    assert dataset["counts"]["inputs"] == dataset["counts"]["samples"] + dataset["counts"]["rejected"]


def test_box_statistics_count_the_samples_boxes_not_the_proposals():
    """inspect's "images with n boxes" and its box-size histogram once disagreed (56 against 59 in the
    demo): the histogram counted proposals that PS3's crop filter and box dedupe drop."""
    regions = pa.Table.from_pylist([
        {"uid": "wide", "region_id": 0, "box": [0, 100, 400, 500]},  # cut away by every crop PS3 makes
        {"uid": "wide", "region_id": 1, "box": [300, 600, 700, 1000]},
        {"uid": "wide", "region_id": 2, "box": [300, 600, 700, 1000]},  # repeats region 1
        {"uid": "gone", "region_id": 0, "box": [10, 10, 500, 500]},  # not a sample
    ])
    manifest = pa.Table.from_pylist([{"uid": "wide", "width": 3072, "height": 1536}])
    rules = SampleRules(ShardsSection(output="unused"), (0.7, 0.9))
    assert sample_boxes(rules, manifest, regions, None) == [(1536, [300, 600, 700, 1000])]
    captions = pa.Table.from_pylist([{"uid": "wide", "region_id": 1, "text": "a red checker pattern", "status": "rejected"},
                                     {"uid": "wide", "region_id": 2, "text": "a blue card", "status": "ok"}])
    assert sample_boxes(rules, manifest, regions, captions) == [(1536, [300, 600, 700, 1000])]  # region 2 stands in
    stats = dataset_statistics(manifest.append_column("boxes", pa.array([1], pa.int32())), sample_boxes(rules, manifest, regions, None),
                               pa.Table.from_pylist([], schema=REGION_STATUS))
    assert stats["box_side_fraction_by_size"] == {"0.25-0.5": 1} and stats["images_by_box_count"] == {"1": 1}


def test_boxes_ps3_can_crop_away_are_left_out_of_samples():
    """A 3072x1536 picture: PS3's loader falls back to a centred 4:3 crop (2048 wide), so a box in the
    leftmost 512 px may be gone from every crop it makes; one that reaches inside stays."""
    assert always_cropped_in(3072, 1536)[0] == 512
    rules = SampleRules(ShardsSection(output="unused"), (0.7, 0.9))
    sample = build_sample(rules, [[0, 100, 400, 500], [300, 600, 700, 1000], [1400, 500, 1800, 900]], 3072, 1536)
    assert sample.box == [[300, 600, 700, 1000], [1400, 500, 1800, 900]]


def test_inspect_prints_box_statistics(regions_run):
    from pipeline.inspection import describe_dataset

    root, _, dataset, _ = regions_run
    text = describe_dataset(str(root / "ds"))
    b = dataset["statistics"]["boxes_per_image"]
    assert f"boxes     per image: min {b['min']}, median {b['median']}, max {b['max']}" in text
    assert "box width / short side" in text and "box height / short side" in text
    assert "no_boxes" in text and "blank" in text


def test_rerun_recomputes_only_what_a_regions_change_touches(regions_run):
    from flows.build import build_dataset

    root, cfg, _, _ = regions_run
    again = build_dataset(cfg, run_id="r1", progress=False)
    assert again["counts"] == regions_run[2]["counts"]
    run = json.loads((root / "work" / "r1" / "run.json").read_text())
    assert {s["stage"]: s["computed"] for s in run["stages"]} == {"ingest": 0, "dedupe": 0, "regions": 0, "caption": 0, "shard": 0}

    cfg2 = {**cfg, "regions": {"k": 2}}
    changed = build_dataset(cfg2, run_id="r1", progress=False)
    run = json.loads((root / "work" / "r1" / "run.json").read_text())
    computed = {s["stage"]: s["computed"] for s in run["stages"]}
    assert computed["ingest"] == 0 and computed["regions"] == 3 and computed["shard"] >= 1
    assert changed["statistics"]["boxes_per_image"]["max"] == 2


def test_the_learned_box_scorer_agrees_with_the_features_the_proposer_computes():
    """regions.scoring: learned reads pipeline/regions/box_scorer.json, written by
    benchmarks/train_box_scorer.py: its feature list is the proposer's, its two tree ensembles give
    probabilities in (0, 1) and finite counts, and the kept boxes are the gate's choice: at most k,
    above the threshold, none mostly inside another beyond max_overlap."""
    from pipeline.regions import distinct, learned
    from pipeline.synthetic import generate_labelled_scene

    model = learned.load_model()
    assert model["features"] == list(learned.FEATURES) and 0 < model["threshold"] < 1
    img, _ = generate_labelled_scene(3)
    a = distinct.analyse(np.asarray(img.resize((256, 192))), RegionsSection().distinct, 1.0)
    features = learned.candidate_features(a)
    assert features.shape == (len(a["candidates"]), len(learned.FEATURES)) and np.isfinite(features).all()
    gate, order = learned.probabilities(features, model), learned.raw_scores(features, model["order"])
    assert ((gate > 0) & (gate < 1)).all() and np.isfinite(order).all()
    kept = learned.pick(a["candidates"], order, gate, 4, model["threshold"], model["max_overlap"])
    assert 1 <= len(kept) <= 4 and (gate[kept] >= model["threshold"]).all()
    assert list(kept) == sorted(kept, key=lambda i: -order[i])
