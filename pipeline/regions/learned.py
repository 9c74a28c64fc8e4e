"""The learned box scorer (regions.scoring: learned): every candidate box of the distinct proposer
(pipeline/regions/distinct.py) described by a few numbers (FEATURES) and judged by two small
gradient-boosted tree models: `gate`, the probability that the box holds a salient detail, and
`order`, how many details it holds. Boxes are taken by `order`, at most k, among those whose `gate`
probability reaches the threshold, skipping a box that mostly overlaps one already taken (a part
inside an object's box is allowed: max_overlap of the smaller box).

The model is box_scorer.json beside this file, written by benchmarks/train_box_scorer.py from the
tuning half of the real-picture set and generated scenes; reading it needs only numpy.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.regions import distinct
from pipeline.regions.boxes import summed_area

MODEL_FILE = Path(__file__).resolve().parent / "box_scorer.json"

FEATURES = (
    "log_held", "held_share", "held_rank", "side", "segments", "log_heaviest", "contrast", "coherence",
    "log_busyness", "log_total", "texture", "colour_vs_picture", "colour_vs_ring", "edges_vs_picture", "edges_vs_ring",
    "centre_distance",
)


def _box_mean(sat: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mean of a map over integer boxes [x1, y1, x2, y2] (copy pixels) from its summed-area table."""
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    total = sat[y2, x2] - sat[y1, x2] - sat[y2, x1] + sat[y1, x1]
    return total / np.maximum((x2 - x1) * (y2 - y1), 1)


def candidate_features(a: dict) -> np.ndarray:
    """One row of FEATURES per candidate of distinct.analyse: the distinct weight it holds (alone,
    as a share of the picture's, as a rank), its size and position, its segments (how many, the
    heaviest, their contrast and edge coherence), how busy the picture is, and how the box's colour,
    texture and edges differ from the picture's and from a ring around it."""
    cand, cover, weight = a["candidates"], a["cover"], a["weight"]
    lab = a["lab"]
    h, w = lab.shape[:2]
    n = len(cand)
    held = cover @ weight
    total = max(float(weight.sum()), 1e-6)
    rank = np.argsort(np.argsort(-held, kind="stable"), kind="stable") / max(n - 1, 1)
    heavy = cover @ (weight > 0.05)
    heaviest = (cover * weight[None, :]).max(axis=1) if n else np.zeros(0)
    contrast = (cover @ (weight * a["contrast"])) / np.maximum(held, 1e-9)
    coherence = (cover @ (weight * a["coherence"])) / np.maximum(held, 1e-9)
    grad = np.hypot(ndimage.sobel(lab[..., 0], axis=1), ndimage.sobel(lab[..., 0], axis=0))
    maps = [lab[..., 0], lab[..., 1], lab[..., 2], lab[..., 0] ** 2, grad]
    sats = [summed_area(m) for m in maps]
    box = np.column_stack([np.clip(np.rint(cand[:, [0, 1, 2, 3]]), 0, [w, h, w, h])]).astype(np.int64)
    side = (cand[:, 2] - cand[:, 0])
    grow = (side / 2)[:, None] * np.array([-1, -1, 1, 1])
    ring_box = np.clip(np.rint(cand + grow), 0, [w, h, w, h]).astype(np.int64)
    inside = [_box_mean(s, box) for s in sats]
    outer = [_box_mean(s, ring_box) for s in sats]
    area_in = np.maximum((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]), 1)
    area_out = np.maximum((ring_box[:, 2] - ring_box[:, 0]) * (ring_box[:, 3] - ring_box[:, 1]), 1)
    ring = [(o * area_out - i * area_in) / np.maximum(area_out - area_in, 1) for i, o in zip(inside, outer)]
    picture_lab = lab.reshape(-1, 3).mean(axis=0)
    spread = max(float(lab.reshape(-1, 3).std(axis=0).sum()), 1e-6)
    box_lab = np.column_stack(inside[:3])
    texture = np.sqrt(np.maximum(inside[3] - inside[0] ** 2, 0)) / max(float(lab[..., 0].std()), 1e-6)
    mean_grad = max(float(grad.mean()), 1e-6)
    cx, cy = (cand[:, 0] + cand[:, 2]) / 2 / w - 0.5, (cand[:, 1] + cand[:, 3]) / 2 / h - 0.5
    return np.column_stack([
        np.log(held + 1e-3), held / total, rank, side / min(h, w), np.log1p(heavy), np.log(heaviest + 1e-3), contrast, coherence,
        np.full(n, np.log(a["segments"] / (h * w))), np.full(n, np.log(total)), texture,
        np.linalg.norm(box_lab - picture_lab, axis=1) / spread, np.linalg.norm(box_lab - np.column_stack(ring[:3]), axis=1) / spread,
        inside[4] / mean_grad, inside[4] / np.maximum(ring[4], 1e-6), np.hypot(cx, cy),
    ]).reshape(n, len(FEATURES))


@cache
def load_model(path: Path = MODEL_FILE) -> dict:
    model = json.loads(path.read_text())
    if model["features"] != list(FEATURES):
        raise ValueError(f"{path} was trained on features {model['features']}, the proposer computes {list(FEATURES)}: "
                         "retrain it (benchmarks/train_box_scorer.py)")
    for part in ("gate", "order"):
        model[part]["trees"] = [{k: np.asarray(v) for k, v in t.items()} for t in model[part]["trees"]]
    return model


def raw_scores(features: np.ndarray, ensemble: dict) -> np.ndarray:
    """The ensemble's raw score per row: its initial value plus the learning rate times the sum of
    its trees' leaves (log-odds for `gate`, log(1 + details) for `order`)."""
    z = np.full(len(features), ensemble["init"], np.float64)
    rows = np.arange(len(features))
    for tree in ensemble["trees"]:
        node = np.zeros(len(features), np.int64)
        for _ in range(ensemble["max_depth"] + 1):
            leaf = tree["left"][node] < 0
            if leaf.all():
                break
            go_left = features[rows, np.maximum(tree["feature"][node], 0)] <= tree["threshold"][node]
            node = np.where(leaf, node, np.where(go_left, tree["left"][node], tree["right"][node]))
        z += ensemble["learning_rate"] * tree["value"][node]
    return z


def probabilities(features: np.ndarray, model: dict) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-raw_scores(features, model["gate"])))


def pick(boxes: np.ndarray, order: np.ndarray, gate: np.ndarray, k: int, threshold: float, max_overlap: float) -> list[int]:
    """Highest `order` first, at most k, among boxes whose `gate` reaches threshold; a box is skipped
    when its intersection with a kept one covers more than max_overlap of the smaller of the two."""
    kept: list[int] = []
    for i in np.argsort(-order, kind="stable"):
        if len(kept) >= k:
            break
        if gate[i] < threshold:
            continue
        b = boxes[i]
        ok = True
        for j in kept:
            c = boxes[j]
            inter = max(0.0, min(b[2], c[2]) - max(b[0], c[0])) * max(0.0, min(b[3], c[3]) - max(b[1], c[1]))
            small = min((b[2] - b[0]) * (b[3] - b[1]), (c[2] - c[0]) * (c[3] - c[1]))
            if inter > max_overlap * small:
                ok = False
                break
        if ok:
            kept.append(int(i))
    return kept


def learned_boxes(pixels: np.ndarray, opts, k: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(boxes in the copy's pixels, gate probabilities) the models keep, in the order taken."""
    model = load_model()
    a = distinct.analyse(pixels, opts, sigma)
    if len(a["candidates"]) == 0:
        return np.zeros((0, 4)), np.zeros(0)
    features = candidate_features(a)
    gate = probabilities(features, model)
    kept = pick(a["candidates"], raw_scores(features, model["order"]), gate, k, model["threshold"], model["max_overlap"])
    return a["candidates"][kept], gate[kept]
