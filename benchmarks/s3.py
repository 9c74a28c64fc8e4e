"""S3 throughput against a local S3 endpoint (moto's server, its own process on 127.0.0.1).

A paired dataset of generated 4K JPEG samples is written locally, then, in the same run:

- upload: `publish_version` (parallel files, multipart parts, ETag checks) next to a plain
  `aws s3 cp`-style copy (boto3 `upload_file` of each file in turn, default transfer settings);
- stream: `open_dataset(s3://...)` iterating every sample (paired tars parsed, keys checked, image
  bytes not decoded) next to a plain sequential `get_object().read()` of the same tars.

    python benchmarks/s3.py [--samples 96] [--per-shard 8]

The last lines are machine-readable:
    BENCH upload_ratio=<publish MB/s / plain copy MB/s>
    BENCH stream_ratio=<loader MB/s / plain GET MB/s>
    BENCH loader_samples_per_s_{1,2,4}w=<raw samples/s through a torch DataLoader with 1, 2 and 4 workers>
    BENCH trainer_samples_per_s_{1,2,4}w=<the same with the trainer's per-sample work in the workers>

The raw figure pickles each 2.5 MB sample back to the main process; the trainer's workers decode
(at reduced size), crop and return 224 px arrays, batched, as `localcap train`'s do.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3  # noqa: E402
import torch  # noqa: E402

from pipeline.dataset_format import SIZES, TAR_SUFFIX, shard_files  # noqa: E402
from pipeline.shards.writer import write_tar  # noqa: E402
from pipeline.storage import Storage  # noqa: E402
from pipeline.synthetic import encode, generate_scene  # noqa: E402
from schemas.sample import TextBoxSample  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def make_dataset(root: Path, samples: int, per_shard: int) -> int:
    """A paired dataset of `samples` 4K JPEG samples; its size in bytes."""
    pictures = [encode(generate_scene(i, 3840, 2160, n_objects=3, grain=6.0)[0], "JPEG", quality=90) for i in range(8)]
    sizes: dict[str, dict[str, int]] = {"image": {}, "text_box": {}}
    for shard in range(-(-samples // per_shard)):
        keys = [f"{k:08x}" for k in range(shard * per_shard, min(samples, (shard + 1) * per_shard))]
        text = TextBoxSample(text=["a box"], box=[[0, 0, 10, 10]], global_text="an image").to_json_bytes()
        for folder, members in (("image", [(f"{k}.jpg", pictures[int(k, 16) % 8]) for k in keys]),
                                ("text_box", [(f"{k}.json", text) for k in keys])):
            (root / folder).mkdir(parents=True, exist_ok=True)
            name = shard_files("paired", shard)[folder]
            write_tar(str(root / folder / name), members)
            sizes[folder][name] = len(keys)
    for folder, counts in sizes.items():
        (root / folder / SIZES).write_text(json.dumps(counts))
    (root / "dataset.json").write_text(json.dumps({"name": "bench", "layout": "paired", "created_at": "now",
                                                   "counts": {"samples": samples, "shards": len(sizes["image"])}}))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


class TrainerExamples(torch.utils.data.IterableDataset):
    """What a DataLoader worker of `localcap train` does per sample (pipeline/train/data.mae_example:
    a reduced decode, a random crop, a 224 px float array), over a ShardDataset."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        from pipeline.train.data import mae_example

        rng = random.Random(0)
        for sample in self.dataset:
            yield mae_example(sample, 224, (0.5, 1.0), rng)


def loader_samples_per_s(uri: str, storage: Storage, workers: int, expected: int, trainer: bool = False) -> float:
    """Samples/s through a torch DataLoader with `workers` spawned processes: raw samples one by one,
    or (`trainer`) the trainer's examples in batches of 8."""
    from pipeline.shards import open_dataset

    dataset = open_dataset(uri, decode=False, storage=storage)
    loader = torch.utils.data.DataLoader(TrainerExamples(dataset) if trainer else dataset, batch_size=8 if trainer else None,
                                         num_workers=workers, multiprocessing_context="spawn")
    it = iter(loader)
    first = next(it)  # the workers' start-up (spawn, imports) is not what is measured
    size = len(first["key"]) if trainer else 1
    t0 = time.perf_counter()
    n = sum(len(b["key"]) if trainer else 1 for b in it)
    assert n + size == expected and first["key"], n
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--per-shard", type=int, default=8, help="samples per shard (~17 MB image tars at 8)")
    ap.add_argument("--concurrency", type=int, default=8, help="publish: files (and parts) in flight")
    ap.add_argument("--part-size-mb", type=int, default=64, help="multipart part size (publish.part_size_mb default)")
    args = ap.parse_args()

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from pipeline.shards import open_dataset
    from pipeline.versions import publish_version

    moto, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory(prefix="localcap-s3-bench-") as tmp:
            root = Path(tmp) / "ds"
            print(f"writing {args.samples} 4K samples, {args.per_shard} per shard ...", flush=True)
            total = make_dataset(root, args.samples, args.per_shard)
            mb = total / 2**20
            files = sorted(p for p in root.rglob("*") if p.is_file())
            print(f"  {len(files)} files, {mb:.0f} MiB; S3 endpoint {endpoint} (moto, own process); {os.cpu_count()} CPUs")
            s3 = boto3.client("s3", endpoint_url=endpoint)
            s3.create_bucket(Bucket="bench")
            storage = Storage(endpoint_url=endpoint)

            t0 = time.perf_counter()
            for p in files:  # `aws s3 cp`-style: one file after another, default transfer settings
                s3.upload_file(str(p), "bench", "plain/" + p.relative_to(root).as_posix())
            plain_up = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = publish_version(storage, root, "s3://bench/datasets/bench", args.concurrency,
                                     args.part_size_mb * 2**20, progress=False)
            ours_up = time.perf_counter() - t0
            print(f"upload: plain copy {mb / plain_up:.1f} MiB/s ({plain_up:.2f} s); publish {mb / ours_up:.1f} MiB/s "
                  f"({ours_up:.2f} s, {result.uploaded} files, ETags checked)")

            tars = [p.relative_to(root).as_posix() for p in files if p.suffix == TAR_SUFFIX]
            tar_mb = sum((root / t).stat().st_size for t in tars) / 2**20
            t0 = time.perf_counter()
            for t in tars:
                s3.get_object(Bucket="bench", Key="plain/" + t)["Body"].read()
            plain_get = time.perf_counter() - t0
            t0 = time.perf_counter()
            n = sum(1 for _ in open_dataset("s3://bench/datasets/bench", decode=False, storage=storage))
            ours_get = time.perf_counter() - t0
            assert n == args.samples, n
            print(f"stream: plain GETs {tar_mb / plain_get:.1f} MiB/s ({plain_get:.2f} s); loader {tar_mb / ours_get:.1f} MiB/s "
                  f"({ours_get:.2f} s, {n} paired samples, {n / ours_get:.0f} samples/s)")
            per_workers = {w: loader_samples_per_s("s3://bench/datasets/bench", storage, w, args.samples) for w in (1, 2, 4)}
            print("DataLoader (spawned workers, shards dealt across them, samples pickled back): "
                  + ", ".join(f"{w} worker(s) {r:.0f} samples/s" for w, r in per_workers.items()))
            per_trainer = {w: loader_samples_per_s("s3://bench/datasets/bench", storage, w, args.samples, trainer=True)
                           for w in (1, 2, 4)}
            print("DataLoader with the trainer's work (224 px examples, batches of 8): "
                  + ", ".join(f"{w} worker(s) {r:.0f} samples/s" for w, r in per_trainer.items()))
    finally:
        moto.terminate()
    print(f"BENCH upload_mib_per_s={mb / ours_up:.1f}")
    print(f"BENCH stream_mib_per_s={tar_mb / ours_get:.1f}")
    print(f"BENCH upload_ratio={plain_up / ours_up:.2f}")
    print(f"BENCH stream_ratio={plain_get / ours_get:.2f}")
    for w, rate in per_workers.items():
        print(f"BENCH loader_samples_per_s_{w}w={rate:.0f}")
    for w, rate in per_trainer.items():
        print(f"BENCH trainer_samples_per_s_{w}w={rate:.0f}")


if __name__ == "__main__":
    main()
