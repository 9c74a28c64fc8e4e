"""Region proposals on real pictures: box precision and detail recall against hand-labelled salient
details (benchmarks/real_photos/set.json), boxes per image, and the regions stage's cost per image by
file kind.

A box hits a labelled detail when their intersection covers at least half of the smaller of the two.
Precision: boxes that hit some detail / all boxes (a box on a picture with no labelled detail is a
miss). Recall: details hit by some box / all details. Cost: what the regions stage spends per image
on one core, decode of its input included: the thumbnail ingest stored (the default) or, with
--from-bytes, the full stored image as before the thumbnail existed. Ingest's own decode (the one
decode of each picture) is printed beside it. The process is pinned to one CPU, BLAS/OpenMP to one
thread; every picture is proposed --repeat times and the median kept.

    python benchmarks/regions_real.py [--cache DIR] [--overlays DIR] [--from-bytes] [--set regions.k=6 ...]

The set is split by package into a tuning half and a validation half (set.json, packages[].split):
the BENCH lines give the validation half, the tuning half's figure beside each in brackets.

Last lines, machine-readable:
    BENCH box_precision=...
    BENCH detail_recall=...
    BENCH boxes_per_image=...
    BENCH ms_per_image=...
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "real_photos"))

import fetch as real_photos  # noqa: E402

from pipeline.ingest.decode import EXACT_COPIES, Rejection, decode_validate  # noqa: E402
from pipeline.regions.proposers import make_proposer  # noqa: E402
from schemas.config import IngestSection, RegionsSection  # noqa: E402


def hits(boxes: np.ndarray, details: np.ndarray, cover: float = 0.5) -> np.ndarray:
    """boxes x details boolean matrix: the intersection covers >= `cover` of the smaller rectangle."""
    if len(boxes) == 0 or len(details) == 0:
        return np.zeros((len(boxes), len(details)), bool)
    b, d = boxes[:, None, :].astype(np.float64), details[None, :, :].astype(np.float64)
    iw = np.clip(np.minimum(b[..., 2], d[..., 2]) - np.maximum(b[..., 0], d[..., 0]), 0, None)
    ih = np.clip(np.minimum(b[..., 3], d[..., 3]) - np.maximum(b[..., 1], d[..., 1]), 0, None)
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    area_d = (d[..., 2] - d[..., 0]) * (d[..., 3] - d[..., 1])
    return iw * ih >= cover * np.minimum(area_b, area_d)


def labelled_pictures(spec: dict) -> list[dict]:
    return [p for p in spec["pictures"] if p.get("labelled", True) and "details" in p]


def regions_config(overrides: list[str]) -> RegionsSection:
    """RegionsSection() with `regions.a.b=value` overrides (values parsed as YAML scalars)."""
    import yaml

    raw: dict = {}
    for item in overrides:
        key, _, value = item.partition("=")
        node = raw
        parts = key.removeprefix("regions.").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return RegionsSection(**raw)


def draw_overlay(path: Path, out: Path, width: int, height: int, boxes: np.ndarray, details: np.ndarray, hit_matrix: np.ndarray) -> None:
    """Labelled details in yellow (dashed look: thin), proposed boxes green when they hit, red when not."""
    from PIL import Image, ImageDraw

    img = Image.open(path)
    img.draft("RGB", (1600, 1600))
    img = img.convert("RGB")
    img.thumbnail((1600, 1600))
    s = img.size[0] / width
    draw = ImageDraw.Draw(img)
    for d in details:
        draw.rectangle([d[0] * s, d[1] * s, d[2] * s, d[3] * s], outline=(255, 220, 0), width=2)
    for i, b in enumerate(boxes):
        colour = (0, 230, 0) if hit_matrix[i].any() else (255, 0, 0)
        draw.rectangle([b[0] * s, b[1] * s, b[2] * s, b[3] * s], outline=colour, width=4)
        draw.text((b[0] * s + 6, b[1] * s + 4), str(i), fill=colour)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, quality=85)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="picture cache (default: $LOCALCAP_REAL_PHOTOS or ~/.cache/localcap/real-photos)")
    ap.add_argument("--overlays", type=Path, default=None, help="write one JPEG per picture with details and boxes drawn")
    ap.add_argument("--from-bytes", action="store_true", help="propose from the full stored image instead of ingest's thumbnail")
    ap.add_argument("--repeat", type=int, default=3, help="timed proposals per picture (median kept)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="regions.KEY=VALUE")
    ap.add_argument("--only", default=None, help="comma-separated picture ids")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    spec = real_photos.load_set()
    cache = real_photos.fetch(args.cache, quiet=True)
    pictures = labelled_pictures(spec)
    if args.only:
        pictures = [p for p in pictures if p["id"] in args.only.split(",")]
    cfg = regions_config(args.overrides)
    limits = IngestSection(min_side=256, max_pixels=200_000_000)
    proposer = make_proposer(cfg)
    source = "stored bytes" if args.from_bytes else f"thumbnail ({limits.thumb_side} px)"
    print(f"{len(pictures)} labelled pictures, {sum(len(p['details']) for p in pictures)} details; "
          f"regions.method={cfg.method}, k={cfg.k}, copy {cfg.downscale} px from the {source}; one CPU")

    split = real_photos.package_split(spec)
    results: dict[str, list[tuple[int, int, int, int, float, str]]] = defaultdict(list)  # half -> per picture
    ingest_ms: dict[str, list[float]] = defaultdict(list)
    for picture in pictures:
        path = real_photos.picture_path(cache, picture)
        data = path.read_bytes()
        EXACT_COPIES.clear()  # time a real decode, not the memo
        start = time.perf_counter()
        row = decode_validate(data, str(path), limits)
        ingest_ms[picture["kind"]].append((time.perf_counter() - start) * 1000)
        if isinstance(row, Rejection):
            raise SystemExit(f"{picture['id']}: ingest rejected it: {row.reason} {row.detail}")
        stored = row["image"] if args.from_bytes else None
        proposer(stored, row["width"], row["height"], row["thumb"])  # warm-up
        times, proposal = [], None
        for _ in range(args.repeat):
            start = time.perf_counter()
            proposal = proposer(stored, row["width"], row["height"], row["thumb"])
            times.append((time.perf_counter() - start) * 1000)
        boxes = proposal.boxes
        details = np.asarray([d["box"] for d in picture["details"]], np.int64).reshape(-1, 4)
        matrix = hits(boxes, details)
        half = split[picture["package"]]
        results[half].append((len(boxes), int(matrix.any(axis=1).sum()), len(details), int(matrix.any(axis=0).sum()),
                              statistics.median(times), picture["kind"]))
        missed = [picture["details"][j]["what"] for j in np.flatnonzero(~matrix.any(axis=0))]
        print(f"  {half[:3]} {picture['id']:<34} {picture['kind']:<17} {len(boxes)} boxes, {int(matrix.any(axis=1).sum())} on a detail; "
              f"{int(matrix.any(axis=0).sum())}/{len(details)} details found; {statistics.median(times):6.1f} ms"
              + (f"  (no boxes: {proposal.reason.value})" if proposal.reason else "")
              + (f"  missed: {', '.join(missed)}" if missed and len(missed) <= 4 else ""))
        if args.overlays:
            draw_overlay(path, args.overlays / f"{picture['id']}.jpg", row["width"], row["height"], boxes, details, matrix)

    by_kind: dict[str, list[float]] = defaultdict(list)
    for rows in results.values():
        for r in rows:
            by_kind[r[5]].append(r[4])
    print("regions ms per image by file kind (ingest's decode in brackets): " + "; ".join(
        f"{kind} {statistics.mean(ts):.0f} ms [{statistics.mean(ingest_ms[kind]):.0f} ms] x{len(ts)}" for kind, ts in sorted(by_kind.items())))
    figures = {half: summary(rows) for half, rows in results.items()}
    for half in ("validation", "tuning"):
        if half in figures:
            f = figures[half]
            print(f"{half:10s} {f['pictures']} pictures: precision {f['precision']:.3f}, recall {f['recall']:.3f}, "
                  f"{f['boxes_per_image']:.2f} boxes per image, {f['ms']:.1f} ms per image "
                  f"({f['hit_boxes']}/{f['boxes']} boxes on a detail, {f['found']}/{f['details']} details found)")
    headline = figures.get("validation") or next(iter(figures.values()))
    tuning = figures.get("tuning", headline)
    for name, key in (("box_precision", "precision"), ("detail_recall", "recall"), ("boxes_per_image", "boxes_per_image"),
                      ("ms_per_image", "ms")):
        print(f"BENCH {name}={headline[key]:.3f}   (tuning half: {tuning[key]:.3f})")


def summary(rows: list[tuple[int, int, int, int, float, str]]) -> dict:
    boxes, hit, details, found = (sum(r[k] for r in rows) for k in range(4))
    return {"pictures": len(rows), "boxes": boxes, "hit_boxes": hit, "details": details, "found": found,
            "precision": hit / max(boxes, 1), "recall": found / max(details, 1), "boxes_per_image": boxes / max(len(rows), 1),
            "ms": statistics.mean(r[4] for r in rows)}


if __name__ == "__main__":
    main()
