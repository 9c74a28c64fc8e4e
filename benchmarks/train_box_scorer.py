"""Train the learned box scorer (regions.scoring: learned) on the TUNING half of the real-picture set
and on generated scenes, and write pipeline/regions/box_scorer.json.

The distinct proposer's greedy selection is run with a low floor (POOL boxes, min_score POOL_MIN);
each box it picks gets BOX_FEATURES (pipeline/regions/distinct.py) and a label: 1 when it hits a
labelled detail (real pictures: the intersection covers half of the smaller rectangle, as in
benchmarks/regions_real.py) or a planted object (scenes). A logistic regression on the standardised
features (scikit-learn) gives each box a probability; the threshold kept is the one that maximises
F1 on the tuning half's boxes. The validation half is never read here.

    pip install scikit-learn   # training only: the pipeline reads the JSON with numpy
    python benchmarks/train_box_scorer.py [--cache DIR] [--scenes 60] [--out pipeline/regions/box_scorer.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "real_photos"))

import fetch as real_photos  # noqa: E402

from pipeline.ingest.decode import Rejection, decode_validate  # noqa: E402
from pipeline.regions import distinct, learned  # noqa: E402
from pipeline.regions.salient import segmentation_copy  # noqa: E402
from pipeline.synthetic import encode, generate_labelled_scene, generate_scene  # noqa: E402
from schemas.config import IngestSection, RegionsSection  # noqa: E402


def box_hits(boxes: np.ndarray, targets: np.ndarray, cover: float = 0.5) -> np.ndarray:
    """Per box: whether it hits some target (intersection >= cover of the smaller rectangle)."""
    if len(boxes) == 0 or len(targets) == 0:
        return np.zeros(len(boxes), bool)
    b, d = boxes[:, None, :], targets[None, :, :]
    iw = np.clip(np.minimum(b[..., 2], d[..., 2]) - np.maximum(b[..., 0], d[..., 0]), 0, None)
    ih = np.clip(np.minimum(b[..., 3], d[..., 3]) - np.maximum(b[..., 1], d[..., 1]), 0, None)
    small = np.minimum((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]), (d[..., 2] - d[..., 0]) * (d[..., 3] - d[..., 1]))
    return (iw * ih >= cover * small).any(axis=1)


def pool(data: bytes, name: str, cfg: RegionsSection) -> tuple[np.ndarray, np.ndarray]:
    """(boxes in original pixels, features) of the greedy pool of one encoded picture."""
    row = decode_validate(data, name, IngestSection(min_side=256, max_pixels=400_000_000))
    if isinstance(row, Rejection):
        raise SystemExit(f"{name}: rejected by ingest: {row.reason}")
    pixels, sx, sy = segmentation_copy(None, row["thumb"], row["width"], row["height"], cfg.downscale)
    boxes, _, features = distinct.distinct_boxes(pixels, cfg.distinct, learned.POOL, cfg.felzenszwalb.sigma, learned.POOL_MIN)
    return boxes * [sx, sy, sx, sy], features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--scenes", type=int, default=60, help="generated scenes (half grainy 4K-like, half the demo's labelled scenes)")
    ap.add_argument("--out", type=Path, default=ROOT / "pipeline" / "regions" / "box_scorer.json")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    cfg = RegionsSection()
    spec = real_photos.load_set()
    cache = real_photos.fetch(args.cache, quiet=True)
    split = real_photos.package_split(spec)
    X, y, source = [], [], []
    tuning = [p for p in spec["pictures"] if p.get("labelled", True) and "details" in p and split[p["package"]] == "tuning"]
    for picture in tuning:
        boxes, feats = pool(real_photos.picture_path(cache, picture).read_bytes(), picture["id"], cfg)
        details = np.asarray([d["box"] for d in picture["details"]], np.float64).reshape(-1, 4)
        X.append(feats)
        y.append(box_hits(boxes, details))
        source += ["real"] * len(boxes)
    for seed in range(args.scenes):
        img, objects = (generate_scene(5000 + seed, 2048, 1152, n_objects=3, grain=6.0) if seed % 2
                        else generate_labelled_scene(5000 + seed))
        boxes, feats = pool(encode(img, "JPEG", quality=90), f"scene-{seed}", cfg)
        X.append(feats)
        y.append(box_hits(boxes, np.asarray([o.box for o in objects], np.float64)))
        source += ["scene"] * len(boxes)
    X, y, source = np.concatenate(X), np.concatenate(y).astype(int), np.asarray(source)
    mean, scale = X.mean(axis=0), X.std(axis=0) + 1e-9
    model = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit((X - mean) / scale, y)
    prob = model.predict_proba((X - mean) / scale)[:, 1]
    real = source == "real"
    thresholds = np.linspace(0.2, 0.9, 71)
    best = max(thresholds, key=lambda t: f1_score(y[real], prob[real] >= t))
    out = {"about": "Logistic regression over distinct-proposer box features (benchmarks/train_box_scorer.py); "
                    f"trained on {int(real.sum())} boxes of the real-picture set's tuning half and {int((~real).sum())} of generated scenes.",
           "features": list(distinct.BOX_FEATURES), "mean": mean.tolist(), "scale": scale.tolist(),
           "coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0]), "threshold": float(best)}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for name, mask in (("real tuning boxes", real), ("scene boxes", ~real)):
        keep = prob[mask] >= best
        print(f"{name}: {mask.sum()} boxes, {y[mask].mean():.2f} positive; kept {keep.sum()}, "
              f"precision {y[mask][keep].mean() if keep.any() else 0:.3f}, recall {keep[y[mask] == 1].mean():.3f}")
    print("weights: " + ", ".join(f"{n} {c:+.2f}" for n, c in zip(distinct.BOX_FEATURES, model.coef_[0])))
    print(f"threshold {best:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
