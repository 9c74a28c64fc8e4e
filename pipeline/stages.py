"""Stage drivers: turn a config and a run directory into partition jobs and run them on Ray.

Each function here is what one Prefect task calls; it holds no orchestration logic of its own
(retries, artifacts, logging to Prefect live in flows/).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata

import pyarrow as pa
import pyarrow.compute as pc

from dedupe import exact
from pipeline.executor import PartitionJob, StageReport, run_stage
from pipeline.ingest.reader import chunk, list_inputs
from pipeline.ingest.stage import IngestPayload, ingest_partition, partition_fingerprint
from pipeline.partitions import code_version, fingerprint, part_name, read_table, read_tables
from pipeline.shards.plan import assign_shards
from pipeline.shards.stage import ShardPayload, finalize_shards, plan_samples, shard_fingerprint, write_shard
from pipeline.storage import Storage, join
from schemas.config import RunConfig
from schemas.tables import IMAGES, REJECTS

STAGES = ("ingest", "dedupe", "shard")


@dataclass
class RunContext:
    config: RunConfig
    run_id: str
    storage: Storage
    progress: bool = True

    @property
    def run_dir(self) -> str:
        return join(self.config.run.work_dir, self.run_id)

    def stage_dir(self, stage: str) -> str:
        return join(self.run_dir, stage)


def make_context(config: RunConfig, run_id: str, progress: bool = True) -> RunContext:
    return RunContext(config, run_id, Storage(config.storage.endpoint_url, config.storage.region), progress)


# -- ingest ------------------------------------------------------------------------------------
def ingest_jobs(ctx: RunContext) -> tuple[int, list[PartitionJob]]:
    """(number of inputs, one job per partition of the sorted listing)."""
    entries = list_inputs(ctx.config.sources, ctx.storage)
    limits = ctx.config.ingest
    jobs = [
        PartitionJob(i, partition_fingerprint(part, limits), IngestPayload(part, limits, ctx.storage))
        for i, part in enumerate(chunk(entries, limits.partition_size))
    ]
    return len(entries), jobs


def run_ingest(ctx: RunContext) -> tuple[StageReport, list[str]]:
    n_inputs, jobs = ingest_jobs(ctx)
    report = run_stage("ingest", ctx.run_dir, jobs, ingest_partition, ctx.storage, progress=ctx.progress, marker="images")
    report.rows["inputs"] = n_inputs
    return report, [j.fingerprint for j in jobs]


# -- dedupe ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DedupePayload:
    ingest_dir: str
    n_partitions: int
    storage: Storage


def dedupe_partition(payload: DedupePayload) -> dict[str, pa.Table]:
    images = read_tables(payload.storage, payload.ingest_dir, "part", IMAGES,
                         columns=["uid", "sha256", "source_uri"])
    table, rejects = exact.exact_duplicates(images)
    return {"rejects": rejects, "part": table}


def run_dedupe(ctx: RunContext, ingest_fingerprints: list[str]) -> StageReport:
    if not ctx.config.dedupe.exact:  # no jobs: also clears what an earlier attempt with it on wrote
        return run_stage("dedupe", ctx.run_dir, [], dedupe_partition, ctx.storage, progress=False)
    fp = fingerprint("dedupe", code_version(exact), ctx.config.dedupe, ingest_fingerprints)
    payload = DedupePayload(ctx.stage_dir("ingest"), len(ingest_fingerprints), ctx.storage)
    return run_stage("dedupe", ctx.run_dir, [PartitionJob(0, fp, payload)], dedupe_partition, ctx.storage,
                     progress=ctx.progress, marker="images")


# -- shards ------------------------------------------------------------------------------------
def run_shards(ctx: RunContext, ingest_fingerprints: list[str]) -> StageReport:
    cfg = ctx.config.shards
    excluded: set[str] = set()
    if ctx.config.dedupe.exact:
        dupes = read_table(ctx.storage, join(ctx.stage_dir("dedupe"), part_name(0, "rejects")), columns=["source_uri"])
        excluded = set(dupes["source_uri"].to_pylist())
    samples = plan_samples(ctx.storage, ctx.stage_dir("ingest"), len(ingest_fingerprints), excluded)
    groups = assign_shards(samples, cfg.max_samples, cfg.max_bytes, combined=cfg.layout == "combined")
    fps = dict(enumerate(ingest_fingerprints))
    jobs = []
    for i, group in enumerate(groups):
        payload = ShardPayload(i, group, ctx.stage_dir("ingest"), cfg, ctx.storage)
        jobs.append(PartitionJob(i, shard_fingerprint(payload, fps), payload))
    return run_stage("shard", ctx.run_dir, jobs, write_shard, ctx.storage, progress=ctx.progress, marker="samples")


# -- the dataset files -------------------------------------------------------------------------
def collect_rejects(ctx: RunContext) -> pa.Table:
    tables = [read_tables(ctx.storage, ctx.stage_dir(s), "rejects", REJECTS) for s in STAGES]
    return pa.concat_tables(tables)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("localcap", "ray", "prefect", "pyarrow", "pillow", "webdataset", "imagehash", "pydantic"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    return {"min": s[0], "median": s[len(s) // 2], "max": s[-1], "mean": round(sum(s) / len(s), 3)}


def dataset_statistics(manifest: pa.Table) -> dict:
    widths, heights = manifest["width"].to_pylist(), manifest["height"].to_pylist()
    return {
        "width": _stats(widths),
        "height": _stats(heights),
        "megapixels": _stats([round(w * h / 1e6, 3) for w, h in zip(widths, heights)]),
        "boxes_per_image": _stats(manifest["boxes"].to_pylist()),
    }


def count_summary(n_inputs: int, manifest: pa.Table, rejects: pa.Table) -> dict:
    by_reason: dict[str, int] = {}
    for item in pc.value_counts(rejects["reason"]).to_pylist() if rejects.num_rows else []:
        by_reason[item["values"]] = item["counts"]
    counts = {
        "inputs": n_inputs,
        "samples": manifest.num_rows,
        "rejected": rejects.num_rows,
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "shards": len(set(manifest["shard"].to_pylist())),
    }
    if counts["inputs"] != counts["samples"] + counts["rejected"]:
        raise RuntimeError(f"inputs were lost: {counts}")  # a bug, never expected
    return counts


def publish_dataset(ctx: RunContext, n_inputs: int, reports: list[StageReport]) -> dict:
    """manifest.parquet, sizes.json, then dataset.json last; run.json into the run directory."""
    manifest = finalize_shards(ctx.storage, ctx.run_dir, ctx.config.shards)
    counts = count_summary(n_inputs, manifest, collect_rejects(ctx))
    dataset = {
        "name": ctx.config.run.name,
        "run_id": ctx.run_id,
        "layout": ctx.config.shards.layout,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": counts,
        "statistics": dataset_statistics(manifest),
        "versions": package_versions(),
        "config": ctx.config.model_dump(mode="json"),
    }
    ctx.storage.write_bytes(join(ctx.config.shards.output, "dataset.json"), json.dumps(dataset, indent=1).encode())
    run_record = {
        "run_id": ctx.run_id,
        "finished_at": dataset["created_at"],
        "config": dataset["config"],
        "versions": dataset["versions"],
        "argv": sys.argv,
        "stages": [asdict(r) for r in reports],
        "counts": counts,
    }
    ctx.storage.write_bytes(join(ctx.run_dir, "run.json"), json.dumps(run_record, indent=1).encode())
    return dataset
