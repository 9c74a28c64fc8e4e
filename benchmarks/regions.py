"""Region proposals per image on one core: PS3 salient boxes with felzenszwalb on 4K JPEGs, split into
decode (reduced-scale JPEG decode to the segmentation copy), segmentation and scoring (weight map,
summed-area table, grid scores, top-k selection). Also: pyramid tiles, and OCR text lines on a
document page when the `ocr` extra is installed.

The process is pinned to one CPU and BLAS/OpenMP to one thread. Measured: the proposer call on the
stored bytes, as the regions stage makes it. Not measured: generating the images, the first call
(lazy imports).

    python benchmarks/regions.py [--images 24] [--width 3840 --height 2160] [--grain 6]

Last line, machine-readable:  BENCH ms_per_image=...   (felzenszwalb, 4K, one core)
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.regions.proposers import make_proposer  # noqa: E402
from pipeline.synthetic import encode, generate_document, generate_scene  # noqa: E402
from schemas.config import RegionsSection  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--width", type=int, default=3840)
    ap.add_argument("--height", type=int, default=2160)
    ap.add_argument("--grain", type=float, default=6.0, help="per-pixel noise, so JPEGs weigh what photos do")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    jpegs = [encode(generate_scene(i, args.width, args.height, n_objects=4, grain=args.grain)[0], "JPEG", quality=90)
             for i in range(args.images)]
    mb = sum(map(len, jpegs)) / len(jpegs) / 1e6
    print(f"{args.images} JPEGs of {args.width}x{args.height}, {mb:.2f} MB each on average; one CPU")

    salient = make_proposer(RegionsSection())
    salient(jpegs[0], args.width, args.height)  # warm-up: lazy imports
    parts: dict[str, list[float]] = {"decode": [], "segment": [], "score": []}
    totals = []
    for data in jpegs:
        start = time.perf_counter()
        p = salient(data, args.width, args.height)
        totals.append((time.perf_counter() - start) * 1000)
        for k in parts:
            parts[k].append(p.timings[k])
    cfg = RegionsSection()
    print(f"salient/felzenszwalb (copy {cfg.downscale} px, k={cfg.k}): "
          + ", ".join(f"{k} {statistics.mean(v):.1f} ms" for k, v in parts.items())
          + f"; total {statistics.mean(totals):.1f} ms/image (median {statistics.median(totals):.1f})")

    tiles = make_proposer(RegionsSection(method="tiles"))
    start = time.perf_counter()
    n_tiles = sum(len(tiles(d, args.width, args.height).boxes) for d in jpegs)
    print(f"tiles: {(time.perf_counter() - start) * 1000 / len(jpegs):.2f} ms/image, {n_tiles / len(jpegs):.0f} tiles per image")

    try:
        ocr = make_proposer(RegionsSection(method="ocr"))
    except RuntimeError as exc:
        print(f"ocr: skipped ({exc})")
    else:
        pages = [encode(generate_document(i, 1700, 2200)[0], "PNG") for i in range(4)]
        ocr(pages[0], 1700, 2200)
        start = time.perf_counter()
        lines = sum(len(ocr(p, 1700, 2200).boxes) for p in pages)
        print(f"ocr (text lines, 1700x2200 page): {(time.perf_counter() - start) * 1000 / len(pages):.0f} ms/page, "
              f"{lines / len(pages):.1f} lines per page")

    print(f"BENCH ms_per_image={statistics.mean(totals):.1f}")


if __name__ == "__main__":
    main()
