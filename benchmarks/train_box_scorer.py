"""Train the learned box scorer (regions.scoring: learned) on the TUNING half of the real-picture set
and on generated scenes, and write pipeline/regions/box_scorer.json. The validation half is never
read here.

Every candidate box of the distinct proposer gets pipeline/regions/learned.FEATURES and two targets:
whether it hits a labelled detail (real pictures: the intersection covers half of the smaller
rectangle, as benchmarks/regions_real.py counts; scenes: a planted object, its centre inside the box,
as the tests count coverage), and how many it hits. Two gradient-boosted tree models (scikit-learn)
learn them: `gate` (a classifier) and `order` (a regressor on log(1 + hits)). The gate's threshold
and the overlap allowed between kept boxes are chosen on out-of-fold predictions (5 folds by picture,
real pictures and scenes alike): the pair with the highest precision on the tuning pictures that
keeps their recall >= --recall (the issue's floor 0.65 plus a margin) and --scenes-covered of the
planted objects (the demo must stay covered), picture metrics as the benchmark computes them; then
both models are refitted on everything and exported as plain arrays (the pipeline reads them with
numpy). Generated scenes use other seeds than the tests' (1000+, 7100+) and the demo's (0-15).

    pip install 'localcap[scorer]'   # scikit-learn, for training only
    python benchmarks/train_box_scorer.py [--cache DIR] [--scenes 60] [--recall 0.70] [--scenes-covered 0.92]
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

MODEL = {"n_estimators": 150, "max_depth": 3, "learning_rate": 0.05, "subsample": 0.8, "min_samples_leaf": 20}
THRESHOLDS = np.round(np.arange(0.10, 0.91, 0.025), 3)
OVERLAPS = (0.0, 0.25, 0.5, 0.6, 0.75)


def hit_matrix(boxes: np.ndarray, targets: np.ndarray, cover: float = 0.5) -> np.ndarray:
    """boxes x targets: the intersection covers >= cover of the smaller rectangle."""
    if len(boxes) == 0 or len(targets) == 0:
        return np.zeros((len(boxes), len(targets)), bool)
    b, d = boxes[:, None, :], targets[None, :, :]
    iw = np.clip(np.minimum(b[..., 2], d[..., 2]) - np.maximum(b[..., 0], d[..., 0]), 0, None)
    ih = np.clip(np.minimum(b[..., 3], d[..., 3]) - np.maximum(b[..., 1], d[..., 1]), 0, None)
    small = np.minimum((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]), (d[..., 2] - d[..., 0]) * (d[..., 3] - d[..., 1]))
    return iw * ih >= cover * small


def centre_inside(boxes: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """boxes x targets: the target's centre lies inside the box (how the planted objects count as covered)."""
    cx, cy = (targets[:, 0] + targets[:, 2]) / 2, (targets[:, 1] + targets[:, 3]) / 2
    return ((boxes[:, None, 0] <= cx) & (cx < boxes[:, None, 2]) & (boxes[:, None, 1] <= cy) & (cy < boxes[:, None, 3]))


def picture(data: bytes, name: str, targets: np.ndarray, cfg: RegionsSection, centres: bool = False) -> dict:
    """Candidates (original pixels), their features and hit matrix against the targets (for planted
    objects, `centres`: a box hits one only when it also holds its centre)."""
    row = decode_validate(data, name, IngestSection(min_side=256, max_pixels=400_000_000))
    if isinstance(row, Rejection):
        raise SystemExit(f"{name}: rejected by ingest: {row.reason}")
    pixels, sx, sy = segmentation_copy(None, row["thumb"], row["width"], row["height"], cfg.downscale)
    a = distinct.analyse(pixels, cfg.distinct, cfg.felzenszwalb.sigma)
    boxes = a["candidates"] * [sx, sy, sx, sy]
    return {"name": name, "boxes": boxes, "copy_boxes": a["candidates"], "features": learned.candidate_features(a),
            "hits": hit_matrix(boxes, targets) & (centre_inside(boxes, targets) if centres else True), "targets": len(targets)}


def evaluate(pictures: list[dict], orders: list[np.ndarray], gates: list[np.ndarray], threshold: float, overlap: float,
             k: int = 4) -> tuple[float, float, float]:
    """(precision, recall, boxes per picture) of the kept boxes, as benchmarks/regions_real.py counts."""
    boxes = hit = details = found = 0
    for p, order, gate in zip(pictures, orders, gates):
        kept = learned.pick(p["copy_boxes"], order, gate, k, threshold, overlap)
        m = p["hits"][kept]
        boxes += len(kept)
        hit += int(m.any(axis=1).sum())
        details += p["targets"]
        found += int(m.any(axis=0).sum())
    return hit / max(boxes, 1), found / max(details, 1), boxes / max(len(pictures), 1)


def export(model, init: float) -> dict:
    trees = []
    for est in model.estimators_[:, 0]:
        t = est.tree_
        trees.append({"left": t.children_left.tolist(), "right": t.children_right.tolist(), "feature": t.feature.tolist(),
                      "threshold": [round(float(v), 6) for v in t.threshold], "value": [round(float(v), 6) for v in t.value[:, 0, 0]]})
    return {"init": init, "learning_rate": model.learning_rate, "max_depth": model.max_depth, "trees": trees}


def fit(pictures: list[dict]):
    """(gate classifier, order regressor) fitted on the pictures' candidates."""
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

    X = np.concatenate([p["features"] for p in pictures])
    hits = np.concatenate([p["hits"].sum(axis=1) for p in pictures]).astype(float)
    gate = GradientBoostingClassifier(random_state=0, **MODEL).fit(X, (hits > 0).astype(int))
    order = GradientBoostingRegressor(random_state=0, **MODEL).fit(X, np.log1p(hits))
    return gate, order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--scenes", type=int, default=60, help="generated scenes (half grainy, half the demo's labelled scenes)")
    ap.add_argument("--recall", type=float, default=0.70, help="recall the choice must keep on the tuning half")
    ap.add_argument("--scenes-covered", type=float, default=0.92, help="share of planted objects the scenes' boxes must hold")
    ap.add_argument("--out", type=Path, default=ROOT / "pipeline" / "regions" / "box_scorer.json")
    args = ap.parse_args()
    cfg = RegionsSection()
    spec = real_photos.load_set()
    cache = real_photos.fetch(args.cache, quiet=True)
    split = real_photos.package_split(spec)
    real = [picture(real_photos.picture_path(cache, p).read_bytes(), p["id"], np.asarray([d["box"] for d in p["details"]], float).reshape(-1, 4), cfg)
            for p in spec["pictures"] if p.get("labelled", True) and "details" in p and split[p["package"]] == "tuning"]
    scenes = []
    sizes = [(2048, 1536), (3840, 2160), (2160, 3840), (2560, 1440), (3000, 2000), (4096, 3072)]
    for seed in range(args.scenes):  # the tests' kinds of scene, other seeds (the tests use 1000+ and 7100+, the demo 0-15)
        if seed % 2:
            rng = np.random.default_rng(5000 + seed)
            w, h = sizes[seed // 2 % len(sizes)]
            img, objects = generate_scene(5000 + seed, w, h, n_objects=int(rng.integers(2, 5)), grain=float(rng.choice([0.0, 4.0, 8.0])))
        else:
            img, objects = generate_labelled_scene(5000 + seed)
        scenes.append(picture(encode(img, "JPEG", quality=90), f"scene-{seed}", np.asarray([o.box for o in objects], float), cfg, centres=True))

    # Out-of-fold predictions: each fold's models never saw its pictures (real pictures and scenes alike).
    everything = real + scenes
    folds = np.arange(len(everything)) % 5
    orders, gates = [None] * len(everything), [None] * len(everything)
    for f in range(5):
        gate, order = fit([p for p, g in zip(everything, folds) if g != f])
        for i in np.flatnonzero(folds == f):
            feats = everything[i]["features"]
            gates[i] = gate.predict_proba(feats)[:, 1] if len(feats) else np.zeros(0)
            orders[i] = order.predict(feats) if len(feats) else np.zeros(0)
    n = len(real)
    grid = [(t, o, *evaluate(real, orders[:n], gates[:n], t, o), evaluate(scenes, orders[n:], gates[n:], t, o)[1])
            for t in THRESHOLDS for o in OVERLAPS]
    good = [g for g in grid if g[3] >= args.recall and g[5] >= args.scenes_covered]
    for o in OVERLAPS:  # the trade-off, for the record
        rows = [g for g in grid if g[1] == o and g[3] >= args.recall and g[5] >= args.scenes_covered]
        best = max(rows, key=lambda g: (g[2], g[3]), default=None)
        if best:
            print(f"  overlap {o}: threshold {best[0]}: precision {best[2]:.3f}, recall {best[3]:.3f}, scenes {best[5]:.3f}")
    threshold, overlap, precision, recall, per_image, covered = (max(good, key=lambda g: (g[2], g[3])) if good
                                                                 else max(grid, key=lambda g: 2 * g[2] * g[3] / max(g[2] + g[3], 1e-9)))
    print(f"out-of-fold on the tuning half ({len(real)} pictures): threshold {threshold}, overlap {overlap}: precision {precision:.3f}, "
          f"recall {recall:.3f}, {per_image:.2f} boxes per picture; planted objects covered on the scenes {covered:.3f}"
          + ("" if good else f" (no threshold keeps recall {args.recall} with {args.scenes_covered} covered)"))

    gate, order = fit(real + scenes)
    prior = float(gate.init_.class_prior_[1])
    out = {"about": "Gradient-boosted trees over distinct-proposer candidate features (benchmarks/train_box_scorer.py), trained on "
                    f"{sum(len(p['boxes']) for p in real)} candidates of the real-picture set's tuning half ({len(real)} pictures) and "
                    f"{sum(len(p['boxes']) for p in scenes)} of {len(scenes)} generated scenes; threshold and overlap chosen out of fold "
                    f"(precision {precision:.3f}, recall {recall:.3f} there).",
           "features": list(learned.FEATURES), "threshold": float(threshold), "max_overlap": float(overlap),
           "gate": export(gate, float(np.log(prior / (1 - prior)))), "order": export(order, float(order.init_.constant_[0][0]))}
    X = np.concatenate([p["features"] for p in real])[:300]
    loaded = json.loads(json.dumps(out))
    for part in ("gate", "order"):
        loaded[part]["trees"] = [{k: np.asarray(v) for k, v in t.items()} for t in loaded[part]["trees"]]
    assert np.allclose(learned.probabilities(X, loaded), gate.predict_proba(X)[:, 1], atol=1e-4), "exported gate disagrees"
    assert np.allclose(learned.raw_scores(X, loaded["order"]), order.predict(X), atol=1e-4), "exported order disagrees"
    args.out.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
