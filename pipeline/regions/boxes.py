"""Box arithmetic shared by the proposers: candidate grids, summed-area scoring, greedy selection.

Boxes are `[x1, y1, x2, y2]` half-open integer rectangles in original-image pixels, as int64 arrays
of shape (n, 4); two boxes that only touch do not overlap.
"""

from __future__ import annotations

import math

import numpy as np


def candidate_grid(width: int, height: int, side_fraction: float, stride_fraction: float,
                   aspects: tuple[float, ...] = (1.0, 1.5, 1 / 1.5)) -> np.ndarray:
    """Every grid box: side = short side * side_fraction, plus boxes of the same area at the other
    aspects (width / height), laid at a stride of stride_fraction * side; all lie inside the image."""
    side = side_fraction * min(width, height)
    stride = max(1, round(stride_fraction * side))
    out = []
    for aspect in aspects:
        bw = min(width, max(1, round(side * math.sqrt(aspect))))
        bh = min(height, max(1, round(side / math.sqrt(aspect))))
        xs = _positions(width - bw, stride)
        ys = _positions(height - bh, stride)
        x1, y1 = np.meshgrid(xs, ys, indexing="xy")
        x1, y1 = x1.ravel(), y1.ravel()
        out.append(np.stack([x1, y1, x1 + bw, y1 + bh], axis=1))
    return np.concatenate(out).astype(np.int64)


def _positions(span: int, stride: int) -> np.ndarray:
    """0, stride, 2*stride, ... and the last position `span`, so the far edge is covered too."""
    pos = np.arange(0, span + 1, stride)
    return pos if pos[-1] == span else np.append(pos, span)


def summed_area(weights: np.ndarray) -> np.ndarray:
    """Zero-padded 2-D cumulative sum: the sum over [y1:y2, x1:x2] is four lookups."""
    sat = np.zeros((weights.shape[0] + 1, weights.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(weights, axis=0, dtype=np.float64), axis=1, out=sat[1:, 1:])
    return sat


def box_sums(sat: np.ndarray, boxes: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Sum of the weight map inside each original-pixel box, the map being 1/scale of the image."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    x1 = np.clip(np.rint(boxes[:, 0] / scale_x), 0, w).astype(np.int64)
    x2 = np.clip(np.rint(boxes[:, 2] / scale_x), 0, w).astype(np.int64)
    y1 = np.clip(np.rint(boxes[:, 1] / scale_y), 0, h).astype(np.int64)
    y2 = np.clip(np.rint(boxes[:, 3] / scale_y), 0, h).astype(np.int64)
    return sat[y2, x2] - sat[y1, x2] - sat[y2, x1] + sat[y1, x1]


def select_non_overlapping(boxes: np.ndarray, scores: np.ndarray, k: int, min_score: float = -np.inf) -> np.ndarray:
    """Indices of the top-k boxes by score (ties: grid order) such that no two overlap."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    for i in order:
        if len(kept) >= k or scores[i] < min_score:
            break
        if kept:
            other = boxes[kept]
            overlap = ((np.minimum(other[:, 2], boxes[i, 2]) > np.maximum(other[:, 0], boxes[i, 0]))
                       & (np.minimum(other[:, 3], boxes[i, 3]) > np.maximum(other[:, 1], boxes[i, 1])))
            if overlap.any():
                continue
        kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def check_boxes(boxes: np.ndarray, width: int, height: int) -> None:
    """The contract every proposer's output meets (a bug if not)."""
    b = np.asarray(boxes).reshape(-1, 4)
    ok = (b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3]) & (b[:, 2] <= width) & (b[:, 3] <= height)
    if not ok.all():
        raise AssertionError(f"boxes outside the {width}x{height} image or empty: {b[~ok].tolist()}")
