"""Fetch throughput: our ingest of a URL list next to img2dataset's on the same list, same run.

N generated 4K JPEGs are served from memory by a local HTTP server (its own process, HTTP/1.1
keep-alive, 127.0.0.1). Both sides fetch, validate (decode), hash (sha256) and stage every image:

- **localcap**: the ingest stage of a `urls` source through Ray (`--processes` CPUs, so that many
  partitions at once, `fetch.concurrency = --threads` requests in flight each): fetch, decode-validate
  at 1/8 scale, sha256 + perceptual hashes, bytes stored as they arrived, Parquet partitions written.
- **img2dataset** (installed into a throwaway venv by this script, `pip install img2dataset==1.47.0`):
  `resize_mode="no"`, `skip_reencode=True` (it still decodes every image to validate it, and keeps the
  original bytes), `compute_hash="sha256"`, `extract_exif=False`, `processes_count=--processes`,
  `thread_count=--threads`, one shard per process, `output_format="files"`.

Both are timed at steady state, without process start-up and imports: localcap's workers are warmed
by an untimed partition first; img2dataset's time is from its first shard's start to its last shard's
end (its own stats files). The whole-call time of img2dataset is printed too. The server shares the
CPUs with both.

    python benchmarks/fetch.py [--images 192] [--processes 2] [--threads 16] [--partition-size 32]

The last line is machine-readable:  BENCH ratio_vs_img2dataset=<localcap images/s / img2dataset images/s>
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ingest import generate  # noqa: E402
from schemas.config import FetchSection  # noqa: E402

I2D_VERSION = "1.47.0"
DEFAULT_VENV = Path.home() / ".cache" / "localcap-bench" / f"img2dataset-{I2D_VERSION}"


def serve_folder(folder: str, port_queue) -> None:
    """A keep-alive HTTP server of the folder's files, from memory (runs in its own process)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    files = {"/" + p.name: p.read_bytes() for p in Path(folder).iterdir()}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    httpd = Server(("127.0.0.1", 0), Handler)
    port_queue.put(httpd.server_address[1])
    httpd.serve_forever()


def img2dataset_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"installing img2dataset=={I2D_VERSION} into a throwaway venv {venv} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"img2dataset=={I2D_VERSION}"], check=True)
    return python


I2D_DRIVER = textwrap.dedent("""
    import glob, json, os, sys, time
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import would phone home otherwise
    from img2dataset import download
    url_list, out, procs, threads, per_shard = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    if __name__ == "__main__":
        t0 = time.perf_counter()
        download(url_list=url_list, input_format="txt", output_folder=out, output_format="files",
                 processes_count=procs, thread_count=threads, number_sample_per_shard=per_shard,
                 resize_mode="no", skip_reencode=True, compute_hash="sha256", extract_exif=False,
                 distributor="multiprocessing", timeout=30, retries=0, enable_wandb=False)
        wall = time.perf_counter() - t0
        stats = [json.load(open(p)) for p in glob.glob(out + "/*_stats.json")]
        print(json.dumps({"wall_s": wall, "successes": sum(s["successes"] for s in stats),
                          "span_s": max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)}))
""")


def run_img2dataset(python: Path, urls: list[str], root: Path, procs: int, threads: int) -> dict:
    url_list = root / "urls.txt"
    url_list.write_text("\n".join(urls) + "\n")
    driver = root / "i2d_driver.py"
    driver.write_text(I2D_DRIVER)
    out = root / f"i2d-out-{time.time_ns()}"  # a fresh folder: its incremental mode skips finished shards
    per_shard = -(-len(urls) // procs)  # one shard per process, or only one process works
    proc = subprocess.run([str(python), str(driver), str(url_list), str(out), str(procs), str(threads), str(per_shard)],
                          capture_output=True, text=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    if proc.returncode != 0:
        raise RuntimeError("img2dataset failed:\n" + proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_localcap(urls: list[str], warm_urls: list[str], root: Path, procs: int, threads: int, partition_size: int) -> dict:
    import ray

    from pipeline.executor import run_stage
    from pipeline.ingest.stage import IngestStage, ingest_partition
    from pipeline.stage import make_context
    from schemas.config import parse_config

    ray.init(num_cpus=procs, include_dashboard=False, logging_level="WARNING")

    def context(name: str, url_list: list[str]):
        path = root / f"{name}.txt"
        path.write_text("\n".join(url_list) + "\n")
        config = parse_config({
            "run": {"work_dir": str(root / "localcap-work")}, "sources": [{"type": "urls", "uri": str(path)}],
            "shards": {"output": str(root / "unused")}, "ingest": {"min_side": 64},
            "fetch": {"allow_private": True, "concurrency": threads, "per_host_concurrency": threads * procs,
                      "per_host_rate": 10_000, "partition_size": min(partition_size, -(-len(url_list) // procs))},
        })
        return make_context(config, run_id=f"{name}-{time.time_ns()}", progress=False)

    # Warm-up, untimed: one partition per worker pays for worker start and first-use imports.
    warm = context("warm", warm_urls)
    jobs = IngestStage(warm).plan({})
    run_stage("ingest", warm.run_dir, jobs, ingest_partition, warm.storage, progress=False)

    ctx = context("timed", urls)
    t0 = time.perf_counter()
    jobs = IngestStage(ctx).plan({})  # reads the list into the urls table
    t1 = time.perf_counter()
    report = run_stage("ingest", ctx.run_dir, jobs, ingest_partition, ctx.storage, progress=False, marker="images")
    t2 = time.perf_counter()
    ray.shutdown()
    return {"discover_s": t1 - t0, "span_s": t2 - t1, "successes": report.rows.get("images", 0), "partitions": len(jobs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=192, help="4K JPEGs to generate and serve")
    ap.add_argument("--width", type=int, default=3840)
    ap.add_argument("--height", type=int, default=2160)
    ap.add_argument("--grain", type=float, default=6.0, help="per-pixel noise so JPEGs weigh what 4K photos do")
    ap.add_argument("--processes", type=int, default=2, help="img2dataset processes = localcap Ray CPUs")
    ap.add_argument("--threads", type=int, default=16, help="img2dataset threads = localcap requests in flight per worker")
    ap.add_argument("--partition-size", type=int, default=FetchSection().partition_size,
                    help="localcap fetch.partition_size (default: the config's default; at most images / processes)")
    ap.add_argument("--rounds", type=int, default=2, help="measure each side this many times, alternating; best kept")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where img2dataset's throwaway venv lives")
    args = ap.parse_args()

    python = img2dataset_python(args.venv)
    with tempfile.TemporaryDirectory(prefix="localcap-fetch-bench-") as tmp:
        root = Path(tmp)
        images = root / "images"
        print(f"generating {args.images} JPEGs of {args.width}x{args.height} ...", flush=True)
        n_bytes = generate(images, args.images, args.width, args.height, args.grain)
        print(f"  {n_bytes / 2**20:.1f} MiB, {n_bytes / args.images / 2**20:.2f} MiB per image")
        ports = multiprocessing.get_context("fork").Queue()
        server = multiprocessing.get_context("fork").Process(target=serve_folder, args=(str(images), ports), daemon=True)
        server.start()
        base = f"http://127.0.0.1:{ports.get(timeout=30)}"
        names = sorted(p.name for p in images.iterdir())
        urls = [f"{base}/{n}" for n in names]
        print(f"serving from {base}; {args.processes} processes x {args.threads} threads on {os.cpu_count()} CPUs")

        ours, theirs = [], []
        try:
            for r in range(args.rounds):
                i2d = run_img2dataset(python, urls, root, args.processes, args.threads)
                theirs.append(i2d)
                print(f"round {r + 1} img2dataset: {i2d['successes']}/{len(urls)} in {i2d['span_s']:.2f} s "
                      f"= {i2d['successes'] / i2d['span_s']:.1f} images/s (whole call {i2d['wall_s']:.2f} s "
                      f"= {i2d['successes'] / i2d['wall_s']:.1f} images/s)", flush=True)
                lc = run_localcap_subprocess(urls, root, args.processes, args.threads, args.partition_size)
                ours.append(lc)
                print(f"round {r + 1} localcap:    {lc['successes']}/{len(urls)} in {lc['span_s']:.2f} s "
                      f"= {lc['successes'] / lc['span_s']:.1f} images/s ({lc['partitions']} partitions; "
                      f"reading the list {lc['discover_s'] * 1000:.0f} ms, not counted)", flush=True)
        finally:
            server.terminate()
        for side, runs in (("img2dataset", theirs), ("localcap", ours)):
            if any(r["successes"] != len(urls) for r in runs):
                raise SystemExit(f"{side} did not fetch every image: {runs}")

    best_theirs = max(r["successes"] / r["span_s"] for r in theirs)
    best_ours = max(r["successes"] / r["span_s"] for r in ours)
    print(f"img2dataset {best_theirs:.1f} images/s, localcap {best_ours:.1f} images/s "
          f"({n_bytes / args.images / 2**20 * best_ours:.0f} MiB/s)")
    print(f"BENCH img2dataset_images_per_s={best_theirs:.1f}")
    print(f"BENCH localcap_images_per_s={best_ours:.1f}")
    print(f"BENCH ratio_vs_img2dataset={best_ours / best_theirs:.2f}")


def run_localcap_subprocess(urls: list[str], root: Path, procs: int, threads: int, partition_size: int) -> dict:
    """Each localcap round in a fresh process (its own Ray), like each img2dataset round."""
    (root / "round.json").write_text(json.dumps({"urls": urls, "root": str(root), "procs": procs, "threads": threads,
                                                 "partition_size": partition_size}))
    proc = subprocess.run([sys.executable, __file__, "--localcap-round", str(root / "round.json")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("localcap round failed:\n" + proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--localcap-round":
        spec = json.loads(Path(sys.argv[2]).read_text())
        urls = spec["urls"]
        warm = urls[: spec["procs"] * 2]
        print(json.dumps(run_localcap(urls, warm, Path(spec["root"]), spec["procs"], spec["threads"], spec["partition_size"])))
    else:
        main()
