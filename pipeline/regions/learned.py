"""The learned box scorer (regions.scoring: learned): the distinct proposer's greedy pool, each box
kept when a small logistic model over its features (distinct.BOX_FEATURES) says it holds a salient
detail. The model is box_scorer.json beside this file, written by benchmarks/train_box_scorer.py
from the tuning half of the real-picture set and generated scenes; reading it needs only numpy.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

from pipeline.regions import distinct

MODEL_FILE = Path(__file__).resolve().parent / "box_scorer.json"
POOL = 8  # boxes the greedy selection offers the model
POOL_MIN = 0.1  # ... down to this much distinct weight (the hand-set floor is min_score 0.4)


@cache
def load_model(path: Path = MODEL_FILE) -> dict:
    model = json.loads(path.read_text())
    if model["features"] != list(distinct.BOX_FEATURES):
        raise ValueError(f"{path} was trained on features {model['features']}, the proposer computes {list(distinct.BOX_FEATURES)}: "
                         "retrain it (benchmarks/train_box_scorer.py)")
    return model


def probabilities(features: np.ndarray, model: dict) -> np.ndarray:
    z = (features - np.asarray(model["mean"])) / np.asarray(model["scale"])
    return 1.0 / (1.0 + np.exp(-(z @ np.asarray(model["coef"]) + model["intercept"])))


def learned_boxes(pixels: np.ndarray, opts, k: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(boxes in the copy's pixels, probabilities): the pool's boxes the model keeps, at most k, in
    the greedy order."""
    model = load_model()
    boxes, _, features = distinct.distinct_boxes(pixels, opts, POOL, sigma, POOL_MIN)
    if len(boxes) == 0:
        return boxes, np.zeros(0)
    p = probabilities(features, model)
    keep = np.flatnonzero(p >= model["threshold"])[:k]
    return boxes[keep], p[keep]
