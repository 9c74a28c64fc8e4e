"""The distributed near-duplicate join (dedupe/distributed.py) at cluster scale, on this machine: tens
of millions of random 64-bit pHashes with planted near pairs, through Ray tasks on a local Ray (its
object store may spill to disk). Prints the join's seconds, the peak memory (PSS) of the whole
process tree (driver, raylet, object store, workers) and the recall over the planted pairs.

Every task reads the one shared copy of the hashes from Ray's object store and handles some of the
band sets of multi-index hashing, so each task's memory grows with N (the hashes, one band key per
hash and its sort order): what limits the join, see docs/scale.md.

    python benchmarks/dedupe_distributed.py [--n 20000000 50000000] [--planted 20000] [--tasks 2]

Last lines, machine-readable, one per size N:
    BENCH distributed_join_seconds_N=...
    BENCH distributed_join_peak_gib_N=...
    BENCH distributed_join_recall_N=...
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dedupe import planted_hashes, recall  # noqa: E402
from benchmarks.scale import TreeSampler  # noqa: E402
from dedupe.distributed import near_pairs_ray  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[20_000_000, 50_000_000])
    ap.add_argument("--planted", type=int, default=20_000)
    ap.add_argument("--radius", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=args.tasks, include_dashboard=False, logging_level="WARNING")
    results = []
    for n in args.n:
        hashes, planted = planted_hashes(n, args.planted, args.radius)
        sampler = TreeSampler(os.getpid())
        start = time.perf_counter()
        found = near_pairs_ray(hashes, args.radius, args.tasks)
        seconds = time.perf_counter() - start
        peak, cpu = sampler.stop()
        r = recall(found, planted, n)
        print(f"{n:,} hashes, radius {args.radius}, {args.tasks} Ray tasks: {seconds:.1f} s ({cpu:.0f} CPU s), "
              f"{len(found):,} pairs ({args.planted:,} planted), recall {r:.4f}, peak memory (PSS) of the tree {peak / 2**30:.2f} GiB "
              f"(the hashes alone: {hashes.nbytes / 2**30:.2f} GiB)", flush=True)
        results.append((n, seconds, peak, r))
        del hashes, found
    for n, seconds, peak, r in results:
        print(f"BENCH distributed_join_seconds_{n}={seconds:.1f}")
        print(f"BENCH distributed_join_peak_gib_{n}={peak / 2**30:.2f}")
        print(f"BENCH distributed_join_recall_{n}={r:.4f}")


if __name__ == "__main__":
    main()
