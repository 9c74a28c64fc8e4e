"""Pyramid tiling: an alternative to salient boxes that covers every part of the image at several
scales (at scale s the image is seen as if shrunk by s and cut into tile x tile pieces)."""

from __future__ import annotations

import math

import numpy as np

from pipeline.regions.boxes import check_boxes


def pyramid_tiles(width: int, height: int, tile: int, scales: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(boxes, the scale of each box). Tiles of a scale are equal squares of side tile/s original
    pixels, spaced evenly so the first and last touch the image edges (overlapping a little when the
    side does not divide the image). Scales whose tile does not fit inside the image are skipped."""
    boxes, box_scales = [], []
    for s in sorted(set(scales), reverse=True):
        side = round(tile / s)
        if side > width or side > height:
            continue
        xs = _spread(width, side)
        ys = _spread(height, side)
        x1, y1 = np.meshgrid(xs, ys, indexing="xy")
        x1, y1 = x1.ravel(), y1.ravel()
        boxes.append(np.stack([x1, y1, x1 + side, y1 + side], axis=1))
        box_scales.append(np.full(len(x1), s, np.float32))
    if not boxes:
        return np.zeros((0, 4), np.int64), np.zeros(0, np.float32)
    out = np.concatenate(boxes).astype(np.int64)
    check_boxes(out, width, height)
    return out, np.concatenate(box_scales)


def _spread(length: int, side: int) -> np.ndarray:
    n = math.ceil(length / side)
    return np.rint(np.linspace(0, length - side, n)).astype(np.int64) if n > 1 else np.zeros(1, np.int64)
