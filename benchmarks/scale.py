"""What a build costs as it grows: generated scenes through the real `localcap run` at several sizes.

Each size N gets N JPEGs of 1024-1536 px (long side) with planted objects (made once, in parallel,
and kept in --dir), and one `localcap run` (captioner.backend none: ingest, dedupe, regions, shard)
in a process whose whole tree (the CLI, Prefect's temporary server, Ray's raylet, GCS and workers) is
sampled every 0.3 s for its memory (PSS) and CPU time. Then the same run id again: a no-op rerun.

Printed per size: wall and CPU seconds per image (the whole tree, and per stage: wall from the stage
reports, CPU from the partitions' own process time), peak memory (PSS) of the tree, files written, Ray tasks
(partitions computed) and Prefect task runs, and the no-op rerun's wall time.

    python benchmarks/scale.py [--sizes 1000 10000] [--dir /tmp/localcap-scale]

The last lines are machine-readable (R = the largest size over the smallest):
    BENCH scale_seconds_per_image_N=...   wall, per size
    BENCH scale_cpu_per_image_ratio=...   CPU seconds per image at R
    BENCH scale_wall_per_image_ratio=...
    BENCH scale_peak_memory_ratio=...
    BENCH scale_noop_rerun_s=...          at the largest size
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOCALCAP = str(Path(sys.executable).with_name("localcap"))


def _one_image(args: tuple[str, int]) -> int:
    from numpy.random import default_rng

    from pipeline.synthetic import encode, generate_scene

    folder, seed = args
    path = Path(folder) / f"scene_{seed:06d}.jpg"
    if not path.exists():
        long = int(default_rng(seed).integers(1024, 1537))
        img, _ = generate_scene(seed, long, long * 3 // 4, n_objects=3, grain=4.0)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(encode(img, "JPEG", quality=90))
        tmp.rename(path)
    return path.stat().st_size


def generate(folder: Path, n: int) -> tuple[int, float]:
    """N scenes in `folder` (the ones already there are kept); their bytes and the seconds it took."""
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        total = sum(pool.map(_one_image, [(str(folder), i) for i in range(n)], chunksize=64))
    return total, time.perf_counter() - started


class TreeSampler:
    """Peak memory and CPU seconds of a process and all its descendants, sampled. Memory is the sum of
    PSS (a shared page, such as Ray's object store mapped by every worker, counted once across them);
    a process that exits between samples keeps the CPU time it had at its last sample."""

    def __init__(self, pid: int, every_s: float = 0.3):
        self.root, self.every = psutil.Process(pid), every_s
        self.peak_memory, self.cpu = 0, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            memory = 0
            for p in procs:
                try:
                    with p.oneshot():
                        memory += p.memory_full_info().pss
                        t = p.cpu_times()
                        self.cpu[(p.pid, p.create_time())] = t.user + t.system
                except psutil.Error:
                    continue
            self.peak_memory = max(self.peak_memory, memory)
            self.done.wait(self.every)

    def stop(self) -> tuple[int, float]:
        self.done.set()
        self.thread.join()
        return self.peak_memory, sum(self.cpu.values())


def run(config: Path, run_id: str) -> dict:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # its own temporary Prefect server, as `localcap run` on a laptop
    started = time.perf_counter()
    proc = subprocess.Popen([LOCALCAP, "run", str(config), "--run-id", run_id, "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid)
    out = proc.communicate()[0]
    peak, cpu = sampler.stop()
    wall = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"localcap run failed ({proc.returncode}):\n{out[-4000:]}")
    task_runs = sum(1 for line in out.splitlines() if "| Task run '" in line and "Finished in state" in line)
    return {"wall_s": wall, "cpu_s": cpu, "peak_memory": peak, "task_runs": task_runs}


def count_files(*folders: Path) -> int:
    return sum(1 for f in folders for p in f.rglob("*") if p.is_file())


def measure(base: Path, n: int) -> dict:
    images = base / f"images-{n}"
    size, gen_s = generate(images, n)
    print(f"{n} images: {size / 2**20:.0f} MiB of JPEG (generated in {gen_s:.0f} s)", flush=True)
    work, out = base / f"work-{n}", base / f"dataset-{n}"
    for folder in (work, out):
        shutil.rmtree(folder, ignore_errors=True)
    config = base / f"scale-{n}.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": f"scale-{n}", "work_dir": str(work)},
        "sources": [{"uri": str(images)}],
        "captioner": {"backend": "none"},
        "shards": {"output": str(out), "keep_empty": True},
    }))
    first = run(config, "scale")
    card = json.loads((out / "dataset.json").read_text())  # before the rerun rewrites it (nothing computed)
    stages = card["builds"][-1]["stages"]
    files = count_files(work, out)
    noop = run(config, "scale")
    return {"n": n, "first": first, "noop_s": noop["wall_s"], "files": files, "stages": stages,
            "samples": card["counts"]["samples"], "ray_tasks": sum(s.get("computed", 0) for s in stages)}


def report(r: dict) -> None:
    n, f = r["n"], r["first"]
    print(f"--- {n} images: {r['samples']} samples")
    print(f"  whole run   wall {f['wall_s']:.1f} s ({1e3 * f['wall_s'] / n:.1f} ms/image), "
          f"CPU {f['cpu_s']:.1f} s ({1e3 * f['cpu_s'] / n:.1f} ms/image), peak memory {f['peak_memory'] / 2**30:.2f} GiB")
    for s in r["stages"]:
        cpu = s.get("cpu_seconds")
        print(f"  {s['stage']:<10}  wall {s['seconds']:7.1f} s ({1e3 * s['seconds'] / n:6.2f} ms/image)"
              + (f"  CPU {cpu:7.1f} s ({1e3 * cpu / n:6.2f} ms/image)" if cpu is not None else "")
              + f"  {s.get('computed', 0)} partitions")
    print(f"  files written {r['files']}, Ray tasks {r['ray_tasks']} (partitions computed), Prefect task runs {f['task_runs']}")
    print(f"  no-op rerun {r['noop_s']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/localcap-scale"), help="images (kept), work dirs, datasets")
    args = ap.parse_args()
    results = [measure(args.dir, n) for n in sorted(args.sizes)]
    for r in results:
        report(r)
    small, big = results[0], results[-1]
    for r in results:
        print(f"BENCH scale_seconds_per_image_{r['n']}={r['first']['wall_s'] / r['n']:.5f}")
    per = lambda r, k: r["first"][k] / r["n"]  # noqa: E731
    print(f"BENCH scale_cpu_per_image_ratio={per(big, 'cpu_s') / per(small, 'cpu_s'):.3f}")
    print(f"BENCH scale_wall_per_image_ratio={per(big, 'wall_s') / per(small, 'wall_s'):.3f}")
    print(f"BENCH scale_peak_memory_ratio={big['first']['peak_memory'] / small['first']['peak_memory']:.3f}")
    print(f"BENCH scale_noop_rerun_s={big['noop_s']:.1f}")


if __name__ == "__main__":
    main()
