"""Ingest throughput on synthetic 4K JPEGs: one process, then the same partitions as Ray tasks.

Measured: decode-validate + hashes + writing the stage Parquet partitions (images and rejects).
Not measured: generating the images, listing them, starting Ray, and each process's one-time warm-up
(Ray worker start, the lazy imports of the first decode: scipy.fftpack for the pHash, ...): both ways
ingest one partition untimed first (Ray: one per worker), so the figures are steady-state throughput.

    python benchmarks/ingest.py [--images 48] [--width 3840 --height 2160] [--partition-size 8]

The last two lines are machine-readable:
    BENCH images_per_s_single_process=...
    BENCH images_per_s=...            (through Ray, all CPUs)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.ingest.reader import chunk  # noqa: E402
from pipeline.ingest.stage import files_key, ingest_entries  # noqa: E402
from pipeline.partitions import fingerprint  # noqa: E402
from pipeline.partitions import part_name, write_table  # noqa: E402
from pipeline.storage import Storage, join  # noqa: E402
from pipeline.synthetic import encode, generate_scene  # noqa: E402
from schemas.config import parse_config  # noqa: E402


def generate(folder: Path, n: int, width: int, height: int, grain: float) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(n):
        img, _ = generate_scene(i, width, height, n_objects=4, grain=grain)
        data = encode(img, "JPEG", quality=90)
        (folder / f"img_{i:05d}.jpg").write_bytes(data)
        total += len(data)
    return total


def single_process(images: str, out_dir: str, partition_size: int) -> tuple[float, int]:
    config = parse_config({"sources": [{"uri": images}], "shards": {"output": out_dir + "-unused"},
                           "ingest": {"partition_size": partition_size}})
    storage = Storage()
    entries = storage.list_files(images)
    parts = chunk(entries, config.ingest.partition_size)
    warm_table, _ = ingest_entries(parts[0], config.ingest, storage)  # warm-up: one partition, untimed
    write_table(storage, join(out_dir + "-warm-up", part_name(0)), warm_table, "warm")
    start = time.perf_counter()
    accepted = 0
    for i, part in enumerate(parts):
        fp = fingerprint(files_key(part, config.ingest))
        table, rejects = ingest_entries(part, config.ingest, storage)
        write_table(storage, join(out_dir, part_name(i, "rejects")), rejects, fp)
        write_table(storage, join(out_dir, part_name(i)), table, fp)
        accepted += table.num_rows
    return time.perf_counter() - start, accepted


def through_ray(images: str, work_dir: str, partition_size: int) -> tuple[float, int, int]:
    import ray

    from pipeline.executor import PartitionJob, run_stage
    from pipeline.ingest.stage import IngestStage, ingest_partition
    from pipeline.stage import make_context

    n_cpus = os.cpu_count() or 1
    ray.init(num_cpus=n_cpus, include_dashboard=False, logging_level="WARNING")

    config = parse_config({"run": {"work_dir": work_dir}, "sources": [{"uri": images}],
                           "shards": {"output": work_dir + "-unused"}, "ingest": {"partition_size": partition_size}})
    ctx = make_context(config, run_id=f"bench-{time.time_ns()}", progress=False)
    jobs = IngestStage(ctx).plan({})

    @ray.remote
    def warm(entry, limits, storage) -> int:
        ingest_entries([entry], limits, storage)  # the imports and first decode a partition task pays once
        time.sleep(0.5)  # hold the worker, so that every CPU's worker gets one
        return os.getpid()

    # One trivial task per CPU, so that worker start-up and first-use imports are not timed.
    first = jobs[0].payload.entries[0]
    pids = set(ray.get([warm.remote(first, config.ingest, ctx.storage) for _ in range(n_cpus)]))
    # ... and one partition per worker through run_stage itself (its first call pays the task's own set-up).
    warm_jobs = [PartitionJob(i, f"warm-{i}", jobs[0].payload) for i in range(n_cpus)]
    run_stage("ingest", join(work_dir, "warm-up"), warm_jobs, ingest_partition, ctx.storage, progress=False)
    start = time.perf_counter()
    report = run_stage("ingest", ctx.run_dir, jobs, ingest_partition, ctx.storage, progress=False, marker="images")
    seconds = time.perf_counter() - start
    assert report.computed == len(jobs) and report.skipped == 0, report
    ray.shutdown()
    return seconds, report.rows.get("images", 0), len(pids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48, help="number of JPEGs to generate")
    ap.add_argument("--width", type=int, default=3840)
    ap.add_argument("--height", type=int, default=2160)
    ap.add_argument("--partition-size", type=int, default=8, help="images per ingest partition")
    ap.add_argument("--grain", type=float, default=6.0,
                    help="per-pixel noise so JPEGs weigh what 4K photos do (0: smooth, ~0.3 MB each)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a fresh temporary folder)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="localcap-bench-") as tmp:
        root = Path(args.workdir or tmp)
        images = root / "images"
        print(f"generating {args.images} JPEGs of {args.width}x{args.height} (quality 90) in {images} ...", flush=True)
        t0 = time.perf_counter()
        n_bytes = generate(images, args.images, args.width, args.height, args.grain)
        print(f"  {n_bytes / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s (not counted), "
              f"{n_bytes / args.images / 2**20:.2f} MiB per image")
        n_parts = -(-args.images // args.partition_size)
        print(f"{n_parts} partitions of up to {args.partition_size} images; {os.cpu_count()} CPUs")

        secs, accepted = single_process(str(images), str(root / f"single-{time.time_ns()}" / "ingest"), args.partition_size)
        single = args.images / secs
        print(f"single process: {args.images} images ({accepted} accepted) in {secs:.2f} s = {single:.1f} images/s, "
              f"{n_bytes / 2**20 / secs:.1f} MiB/s")

        secs, accepted, n_workers = through_ray(str(images), str(root / "ray-work"), args.partition_size)
        rayed = args.images / secs
        print(f"ray ({n_workers} warm workers): {args.images} images ({accepted} accepted) in {secs:.2f} s = "
              f"{rayed:.1f} images/s, {n_bytes / 2**20 / secs:.1f} MiB/s, x{rayed / single:.2f} vs one process")

    print(f"BENCH images_per_s_single_process={single:.1f}")
    print(f"BENCH images_per_s={rayed:.1f}")


if __name__ == "__main__":
    main()
