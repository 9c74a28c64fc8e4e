"""The default salient proposer on real pictures (the committed part of benchmarks/real_photos, at 1024
px) and on the hard cases of issue 18: flat pictures, the edge between two flat regions, texture
beside a single distinct object. Boxes are proposed from ingest's thumbnail, as the regions stage does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.ingest.decode import decode_validate
from pipeline.regions.proposers import make_proposer
from pipeline.synthetic import encode
from schemas.config import IngestSection, RegionsSection

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real"
SET = json.loads((ROOT / "benchmarks" / "real_photos" / "set.json").read_text())
LIMITS = IngestSection(min_side=256)


def propose(data: bytes, scoring: str | None = None):
    row = decode_validate(data, "mem://x", LIMITS)
    assert isinstance(row, dict), row
    cfg = RegionsSection(scoring=scoring) if scoring else RegionsSection()
    return make_proposer(cfg)(None, row["width"], row["height"], row["thumb"]), row


def labelled(picture_id: str, width: int) -> np.ndarray:
    """The picture's hand-labelled details, scaled from original pixels to the committed copy."""
    picture = next(p for p in SET["pictures"] if p["id"] == picture_id)
    return np.asarray([d["box"] for d in picture["details"]], np.float64).reshape(-1, 4) * (width / picture["width"])


def hits(boxes: np.ndarray, details: np.ndarray) -> np.ndarray:
    """boxes x details: the intersection covers at least half of the smaller one (the benchmark's rule)."""
    b, d = boxes[:, None, :].astype(np.float64), details[None, :, :]
    iw = np.clip(np.minimum(b[..., 2], d[..., 2]) - np.maximum(b[..., 0], d[..., 0]), 0, None)
    ih = np.clip(np.minimum(b[..., 3], d[..., 3]) - np.maximum(b[..., 1], d[..., 1]), 0, None)
    area = lambda r: (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])  # noqa: E731
    return iw * ih >= 0.5 * np.minimum(area(b), area(d))


@pytest.mark.parametrize("name, min_found", [
    ("ukui-goldfish.jpg", 5), ("ukui-the-mouse.jpg", 5), ("sway-1920x1080.jpg", 2), ("gnome43-pixels-l.webp", 5),
])
def test_every_box_sits_on_a_labelled_detail(name, min_found):
    """An object on a plain or calm ground: the boxes frame it (or its parts), none lands beside it."""
    p, row = propose((REAL / name).read_bytes())
    details = labelled(Path(name).stem, row["width"])
    m = hits(p.boxes, details)
    assert len(p.boxes) >= 1 and m.any(axis=1).all(), f"boxes off every detail: {p.boxes[~m.any(axis=1)].tolist()}"
    assert m.any(axis=0).sum() >= min_found


@pytest.mark.parametrize("scoring, min_found", [("learned", 2), ("distinct", 3)])
def test_a_photo_gets_boxes_on_its_details(scoring, min_found):
    """The learned scorer keeps fewer boxes here than distinct (the default), all on details."""
    p, row = propose((REAL / "gnome338-road.jpg").read_bytes(), scoring)
    m = hits(p.boxes, labelled("gnome338-road", row["width"]))
    assert m.any(axis=1).sum() >= 2 and m.any(axis=0).sum() >= min_found


@pytest.mark.parametrize("name", ["lomiri-warty-final-ubuntu.jpg", "gnome338-adwaita-night.jpg"])
def test_flat_pictures_get_no_boxes(name):
    """Gradients and translucent flat shapes: nothing stands out, so no box (not four filler boxes)."""
    p, _ = propose((REAL / name).read_bytes())
    assert len(p.boxes) == 0 and p.reason == "too_plain"


def _split(width: int = 2000, height: int = 1500) -> Image.Image:
    """Two flat colours meeting along a diagonal edge."""
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.where((xx * 0.6 + yy)[..., None] < 1400, np.array([200, 60, 40]), np.array([30, 70, 190]))
    return Image.fromarray(arr.astype(np.uint8))


def _gradient(width: int = 2000, height: int = 1500) -> Image.Image:
    t = np.linspace(0, 1, width)[None, :, None] * np.ones((height, 1, 1))
    return Image.fromarray((np.array([40, 90, 200]) * (1 - t) + np.array([230, 160, 60]) * t).astype(np.uint8))


@pytest.mark.parametrize("make", [_split, _gradient], ids=["edge between two flat regions", "gradient"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_flat_regions_and_their_edge_score_nothing(make, fmt):
    p, _ = propose(encode(make(), fmt))
    assert len(p.boxes) == 0 and p.reason == "too_plain", p.boxes.tolist()


def test_one_distinct_object_beats_repetitive_texture():
    """A grey repeating texture over the whole picture and one red disc: the first box frames the disc."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:1500, 0:2000]
    texture = 110 + 60 * ((xx // 24 + yy // 24) % 2) + rng.normal(0, 6, (1500, 2000))
    arr = np.repeat(texture[..., None], 3, axis=2)
    disc = (xx - 1400) ** 2 + (yy - 500) ** 2 < 90**2
    arr[disc] = [210, 40, 40]
    p, _ = propose(encode(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "JPEG"))
    assert len(p.boxes) >= 1
    x1, y1, x2, y2 = p.boxes[0].tolist()
    assert x1 <= 1310 and x2 >= 1490 and y1 <= 410 and y2 >= 590, "the disc is framed, not cut"
    assert (x2 - x1) <= 0.45 * 1500
