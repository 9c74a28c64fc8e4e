"""Near-duplicate self-join of random 64-bit hashes with planted near-duplicate pairs: multi-index
hashing (dedupe/near.py) on a million images, and on a 20,000-hash subset beside a brute-force numpy
all-pairs join, to show the speed-up. Recall is over the planted pairs (must be 1.0).

The join of a million images is every search dedupe/clusters.py runs: the pHashes (radius 4), the
structure hashes (theme variants, STRUCT_RADIUS) and the keypoint-window hashes (crops, CROP_POINTS per
image, CROP_RADIUS), each with planted pairs; `seconds_1m` is their sum, `seconds_1m_phash` the pHash
join alone (what `seconds_1m` measured before the other two existed).

    python benchmarks/dedupe.py [--n 1000000] [--planted 10000] [--radius 4]

Last lines, machine-readable:
    BENCH seconds_1m=...
    BENCH seconds_1m_phash=...
    BENCH recall=...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dedupe.clusters import CROP_COMMON, CROP_RADIUS, STRUCT_RADIUS  # noqa: E402
from dedupe.hashing import CROP_POINTS  # noqa: E402
from dedupe.near import near_pairs, near_pairs_brute  # noqa: E402


def planted_hashes(n: int, planted: int, radius: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, planted pairs i < j): random hashes, then `planted` of them overwritten by a copy
    of another with 0..radius bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, np.iinfo(np.int64).max, n, dtype=np.int64).astype(np.uint64) ^ (
        rng.integers(0, 2, n, dtype=np.int64).astype(np.uint64) << np.uint64(63))
    idx = rng.choice(n, 2 * planted, replace=False).reshape(planted, 2)
    for a, b in idx:
        value = hashes[a]
        for bit in rng.choice(64, int(rng.integers(0, radius + 1)), replace=False):
            value ^= np.uint64(1) << np.uint64(int(bit))
        hashes[b] = value
    return hashes, np.sort(idx, axis=1)


def recall(found: np.ndarray, planted: np.ndarray, n: int) -> float:
    found_keys = set((found[:, 0] * n + found[:, 1]).tolist())
    return sum(int(a) * n + int(b) in found_keys for a, b in planted) / len(planted)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--planted", type=int, default=10_000)
    ap.add_argument("--radius", type=int, default=4)
    ap.add_argument("--subset", type=int, default=20_000)
    args = ap.parse_args()

    hashes, planted = planted_hashes(args.n, args.planted, args.radius)
    start = time.perf_counter()
    found = near_pairs(hashes, args.radius)
    seconds = time.perf_counter() - start
    r = recall(found, planted, args.n)
    print(f"pHash: multi-index hashing, {args.n:,} hashes, radius {args.radius}: {seconds:.1f} s, {len(found):,} pairs "
          f"({args.planted:,} planted), recall {r:.4f}")
    del found
    total, recalls = seconds, [r]
    for what, n, radius, kw in [("structure", args.n, STRUCT_RADIUS, {"bands": STRUCT_RADIUS + 2}),
                                ("keypoint windows", args.n * CROP_POINTS, CROP_RADIUS, {"bands": CROP_RADIUS + 2, "drop_over": CROP_COMMON})]:
        extra, extra_planted = planted_hashes(n, args.planted, radius, seed=2 + radius)
        start = time.perf_counter()
        found = near_pairs(extra, radius, **kw)
        took = time.perf_counter() - start
        recalls.append(recall(found, extra_planted, n))
        total += took
        print(f"{what}: {n:,} hashes, radius {radius}: {took:.1f} s, {len(found):,} pairs ({args.planted:,} planted), "
              f"recall {recalls[-1]:.4f}")
        del extra, found
    r = min(recalls)
    print(f"the whole join of {args.n:,} images: {total:.1f} s")

    sub, _ = planted_hashes(args.subset, args.subset // 100, args.radius, seed=1)
    start = time.perf_counter()
    fast = near_pairs(sub, args.radius)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    brute = near_pairs_brute(sub, args.radius)
    brute_s = time.perf_counter() - start
    assert np.array_equal(fast, brute), "multi-index hashing and brute force disagree"
    print(f"{args.subset:,}-hash subset: brute-force numpy all pairs {brute_s:.2f} s, multi-index {fast_s:.2f} s "
          f"({brute_s / fast_s:.0f}x), same {len(brute):,} pairs; brute force on {args.n:,} would take about "
          f"{brute_s * (args.n / args.subset) ** 2 / 3600:.1f} h")
    print(f"BENCH seconds_1m={total:.1f}")
    print(f"BENCH seconds_1m_phash={seconds:.1f}")
    print(f"BENCH recall={r:.4f}")


if __name__ == "__main__":
    main()
