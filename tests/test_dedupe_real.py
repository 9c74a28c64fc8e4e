"""Near duplicates on real pictures (small copies in tests/data/real): light/dark theme variants and
crops are found, distinct pictures are never merged, nor are generated scenes that look alike."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest
from PIL import Image

from dedupe.clusters import near_duplicates
from pipeline.ingest.decode import decode_validate
from pipeline.synthetic import encode, generate_labelled_scene, generate_scene
from schemas.config import IngestSection
from schemas.tables import IMAGES, rows_to_table

REAL = Path(__file__).parent / "data" / "real"
LIMITS = IngestSection(min_side=256)
THEME_PAIRS = [("gnome43-pixels-l.webp", "gnome43-pixels-d.webp"), ("gnome43-symbolic-l.webp", "gnome43-symbolic-d.webp"),
               ("wesnoth-isar-day.webp", "wesnoth-isar-night.webp")]  # the last: structure hashes 4 bits apart
CROP_PAIRS = [("sway-1920x1080.jpg", "sway-1136x640_portrait.jpg")]
DISTINCT = ["gnome338-road.jpg", "ukui-goldfish.jpg", "ukui-the-mouse.jpg", "ukui-desert.png", "lomiri-warty-final-ubuntu.jpg",
            "gnome338-adwaita-day.jpg",
            # one painting with and without its soldiers: the same picture for every hash but two samples
            "wesnoth-battlefield.webp", "wesnoth-battlefield-nohumans.webp"]


def _crop(data: bytes, area: float, fx: float, fy: float) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    cw, ch = int(w * area ** 0.5), int(h * area ** 0.5)
    x0, y0 = int((w - cw) * fx), int((h - ch) * fy)
    return encode(img.crop((x0, y0, x0 + cw, y0 + ch)), "JPEG", quality=90)


def _clusters(items: dict[str, bytes]) -> dict[str, str]:
    """name -> cluster (the kept image's uid) through the real ingest hashes and clustering."""
    rows = {name: decode_validate(data, f"mem://{name}", LIMITS) for name, data in items.items()}
    assert all(isinstance(r, dict) for r in rows.values()), {n: r for n, r in rows.items() if not isinstance(r, dict)}
    table = rows_to_table(list(rows.values()), IMAGES)
    dedupe, _ = near_duplicates(table, None, radius=4, threshold=0.8)
    cluster = dict(zip(dedupe["uid"].to_pylist(), dedupe["cluster"].to_pylist()))
    return {name: cluster[row["uid"]] for name, row in rows.items()}


@pytest.fixture(scope="module")
def real_clusters() -> dict[str, str]:
    names = {n for pair in THEME_PAIRS + CROP_PAIRS for n in pair} | set(DISTINCT) | {"gnome338-adwaita-night.jpg"}
    items = {n: (REAL / n).read_bytes() for n in sorted(names)}
    road = items["gnome338-road.jpg"]
    items["road-third-top-left.jpg"] = _crop(road, 1 / 3, 0.0, 0.0)
    items["road-third-centre.jpg"] = _crop(road, 1 / 3, 0.5, 0.5)
    items["goldfish-half.jpg"] = _crop(items["ukui-goldfish.jpg"], 1 / 2, 1.0, 0.3)
    return _clusters(items)


@pytest.mark.parametrize("a,b", THEME_PAIRS)
def test_light_and_dark_variants_are_near_duplicates(real_clusters, a, b):
    assert real_clusters[a] == real_clusters[b]


@pytest.mark.parametrize("a,b", CROP_PAIRS + [("gnome338-road.jpg", "road-third-top-left.jpg"),
                                              ("gnome338-road.jpg", "road-third-centre.jpg"),
                                              ("ukui-goldfish.jpg", "goldfish-half.jpg")])
def test_crops_are_near_duplicates(real_clusters, a, b):
    assert real_clusters[a] == real_clusters[b]


def test_distinct_pictures_are_not_merged(real_clusters):
    groups = [{a, b} for a, b in THEME_PAIRS + CROP_PAIRS]
    groups += [{"gnome338-road.jpg", "road-third-top-left.jpg", "road-third-centre.jpg"}, {"ukui-goldfish.jpg", "goldfish-half.jpg"}]
    groups += [{n} for n in real_clusters if not any(n in g for g in groups)]
    for g, h in itertools.combinations(groups, 2):
        for a, b in itertools.product(g, h):
            assert real_clusters[a] != real_clusters[b], (a, b)


def _third(data: bytes, at: float) -> bytes:
    """The full-height third of a picture at `at` (0 left, 1 right), at the same pixel scale."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    x0 = int((w - w // 3) * at)
    return encode(img.crop((x0, 0, x0 + w // 3, h)), "JPEG", quality=90)


@pytest.mark.xfail(strict=True, reason="issue 33, not met yet: the keypoint windows of the <= 256 px thumbnails find a "
                                       "full-height third at the same pixel scale only when it is the middle one")
def test_full_height_thirds_at_the_same_pixel_scale_are_near_duplicates():
    items = {n: (REAL / n).read_bytes() for n in ["gnome338-road.jpg", "ukui-goldfish.jpg", "sway-1920x1080.jpg"]}
    for name in list(items):
        for at in (0.0, 0.5, 1.0):
            items[f"{name}~third@{at}"] = _third(items[name], at)
    clusters = _clusters(items)
    missed = [n for n in items if "~" in n and clusters[n] != clusters[n.split("~")[0]]]
    assert not missed, missed


def test_generated_scenes_that_look_alike_are_not_merged():
    items = {}
    for seed in range(12):
        w, h = [(1024, 768), (768, 1024), (1280, 720)][seed % 3]
        items[f"scene-{seed}.jpg"] = encode(generate_scene(7100 + seed, w, h, n_objects=1 + seed % 4, grain=float(seed % 3) * 4)[0], "JPEG", quality=88)
        items[f"labelled-{seed}.jpg"] = encode(generate_labelled_scene(7200 + seed, 1024, 768, n_objects=1 + seed % 3)[0], "JPEG", quality=88)
    for seed in range(3):  # the same background with other objects
        items[f"other-{seed}.jpg"] = encode(generate_scene(7100 + seed * 3, 1024, 768, n_objects=2, object_seed=7300 + seed)[0], "JPEG", quality=88)
    clusters = _clusters(items)
    assert len(set(clusters.values())) == len(items), [n for n in items if list(clusters.values()).count(clusters[n]) > 1]


def test_a_crop_and_a_theme_variant_of_a_published_picture_are_skipped():
    """The structure and window hashes travel in the published index: a later run finds the crop
    and the dark variant of what an earlier version holds; an old index file without those columns
    still works (matched on the pHash)."""
    from dedupe.clusters import INDEX
    from dedupe.index import with_index_columns

    published = {n: decode_validate((REAL / n).read_bytes(), f"mem://{n}", LIMITS) for n in ["gnome338-road.jpg", "gnome43-pixels-l.webp"]}
    index = rows_to_table(list(published.values()), IMAGES).select([f.name for f in INDEX if f.name != "run_id"])
    index = with_index_columns(index)
    road = (REAL / "gnome338-road.jpg").read_bytes()
    new = {"crop.jpg": _crop(road, 1 / 3, 0.8, 0.2), "dark.webp": (REAL / "gnome43-pixels-d.webp").read_bytes(),
           "copy.png": encode(Image.open(io.BytesIO(road)).convert("RGB"), "PNG"), "other.jpg": (REAL / "ukui-goldfish.jpg").read_bytes()}
    run = rows_to_table([decode_validate(d, f"mem://{n}", LIMITS) for n, d in new.items()], IMAGES)
    _, rejects = near_duplicates(run, index, radius=4, threshold=0.8)
    assert sorted(rejects["source_uri"].to_pylist()) == ["mem://copy.png", "mem://crop.jpg", "mem://dark.webp"]
    assert set(rejects["reason"].to_pylist()) == {"duplicate_published"}

    old = with_index_columns(index.select(["uid", "phash", "fine_sig", "width", "height", "run_id"]))
    _, rejects = near_duplicates(run, old, radius=4, threshold=0.8)
    # The copy matches the old index on its pHash, and the crop joins the copy's cluster (this run's
    # windows); the dark variant has nothing to match in the old index.
    assert sorted(rejects["source_uri"].to_pylist()) == ["mem://copy.png", "mem://crop.jpg"]
