"""PS3's salient boxes: segment everything, then keep the grid boxes that hold the most small masks.

Score of a box = sum over masks m of  A_image / max(A_m, floor²) * A(m ∩ box) / A(m)  (docs/design.md, "Regions").
Because that sum is linear in the pixels of the box, it equals the sum, over the box's pixels, of a
per-pixel weight map (each pixel carries A_image / (max(A_m, floor²) * A_m) for every mask m that
covers it). One summed-area table of that map then scores every candidate box in four lookups, for
any number of masks: no loop over boxes x masks.
"""

from __future__ import annotations

import io
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipeline.regions.boxes import (
    box_sums,
    candidate_grid,
    check_boxes,
    select_non_overlapping,
    summed_area,
)
from schemas.tables import NoBoxReason

Image.MAX_IMAGE_PIXELS = None  # ingest already enforced ingest.max_pixels


@dataclass
class Proposal:
    """What a proposer returns for one image: boxes (n x 4, original pixels), scores, and when
    there are none, why (`reason`, a NoBoxReason; `detail` for people)."""

    boxes: np.ndarray
    scores: np.ndarray
    reason: NoBoxReason | None = None
    detail: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def empty(cls, reason: NoBoxReason, detail: str, timings: dict[str, float] | None = None) -> Proposal:
        return cls(np.zeros((0, 4), np.int64), np.zeros(0, np.float32), reason, detail, timings or {})


def decode_downscaled(data: bytes, width: int, height: int, max_side: int) -> tuple[np.ndarray, float, float]:
    """RGB pixels of the stored image with its long side at most `max_side`, and the factors from
    those pixels to original pixels. JPEGs decode at 1/2, 1/4 or 1/8 scale in libjpeg (Image.draft),
    so a 4K JPEG never has all its pixels decoded. Stored bytes decode to the oriented image (ingest
    normalises any that would not), so no EXIF rotation applies here."""
    img = Image.open(io.BytesIO(data))
    if img.size != (width, height):
        raise ValueError(f"stored image is {img.size[0]}x{img.size[1]}, the images table says {width}x{height}")
    factor = min(1.0, max_side / max(width, height))
    target = (max(1, round(width * factor)), max(1, round(height * factor)))
    img.draft("RGB", target)
    img = img.convert("RGB")
    if img.size != target:
        img = img.resize(target, Image.Resampling.BILINEAR)
    return np.asarray(img), width / target[0], height / target[1]


def thumb_pixels(thumb: bytes, width: int, height: int, max_side: int) -> tuple[np.ndarray, float, float]:
    """RGB pixels of ingest's thumbnail (images table `thumb`) with the long side at most
    `max_side`, and the factors to original pixels: the full image is not decoded again."""
    img = Image.open(io.BytesIO(thumb)).convert("RGB")
    factor = min(1.0, max_side / max(img.size))
    if factor < 1.0:
        img = img.resize((max(1, round(img.size[0] * factor)), max(1, round(img.size[1] * factor))), Image.Resampling.BILINEAR)
    return np.asarray(img), width / img.size[0], height / img.size[1]


def segmentation_copy(data: bytes | None, thumb: bytes | None, width: int, height: int, max_side: int) -> tuple[np.ndarray, float, float]:
    """The copy a proposer segments: from ingest's thumbnail when the stored bytes were not read
    (data None), else from the stored bytes (a copy larger than the thumbnail)."""
    if data is None:
        return thumb_pixels(thumb, width, height, max_side)
    return decode_downscaled(data, width, height, max_side)


def thumb_covers(thumb_side: int, max_side: int) -> bool:
    """Whether thumbnails of long side `thumb_side` hold every pixel a `max_side` copy needs."""
    return max_side <= thumb_side


def label_weights(labels: np.ndarray, pixel_area: float, image_area: float, floor_area: float, min_pixels: int) -> np.ndarray:
    """Per-pixel weight map of a label image (one mask per label, masks do not overlap).
    Masks of fewer than `min_pixels` pixels (segmentation noise) weigh nothing."""
    counts = np.bincount(labels.ravel())
    per_mask = _mask_pixel_weights(counts, pixel_area, image_area, floor_area, min_pixels)
    return per_mask[labels]


def stack_weights(masks: np.ndarray, pixel_area: float, image_area: float, floor_area: float, min_pixels: int) -> np.ndarray:
    """Per-pixel weight map of possibly overlapping boolean masks (n x h x w), e.g. SAM's."""
    if len(masks) == 0:
        return np.zeros(masks.shape[1:], np.float64)
    counts = masks.reshape(len(masks), -1).sum(axis=1)
    per_mask = _mask_pixel_weights(counts, pixel_area, image_area, floor_area, min_pixels)
    return np.tensordot(per_mask, masks.astype(np.float32), axes=1)


def _mask_pixel_weights(counts: np.ndarray, pixel_area: float, image_area: float, floor_area: float, min_pixels: int) -> np.ndarray:
    areas = counts * pixel_area
    with np.errstate(divide="ignore", invalid="ignore"):
        w = image_area / (np.maximum(areas, floor_area) * counts)
    return np.where(counts >= max(1, min_pixels), w, 0.0)


def score_candidates(weights: np.ndarray, width: int, height: int, scale_x: float, scale_y: float,
                     side_fraction: float, stride_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(candidate boxes in original pixels, their scores; each map pixel is scale_x*scale_y original pixels)."""
    boxes = candidate_grid(width, height, side_fraction, stride_fraction)
    return boxes, box_sums(summed_area(weights), boxes, scale_x, scale_y)


def top_boxes(weights: np.ndarray, width: int, height: int, scale_x: float, scale_y: float, k: int,
              side_fraction: float, stride_fraction: float, min_score: float) -> Proposal:
    boxes, scores = score_candidates(weights, width, height, scale_x, scale_y, side_fraction, stride_fraction)
    keep = select_non_overlapping(boxes, scores, k, min_score)
    if len(keep) == 0:
        best = float(scores.max()) if len(scores) else 0.0
        return Proposal.empty(NoBoxReason.TOO_PLAIN, f"best box score {best:.2f} < regions.min_score = {min_score}")
    check_boxes(boxes[keep], width, height)
    return Proposal(boxes[keep], scores[keep].astype(np.float32))


@contextmanager
def timed(timings: dict[str, float], name: str):
    """Add the elapsed milliseconds of the block to timings[name]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + (time.perf_counter() - start) * 1000
