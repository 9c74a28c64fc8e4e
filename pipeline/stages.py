"""Stage drivers: turn a config and a run directory into partition jobs and run them on Ray.

Each function here is what one Prefect task calls; it holds no orchestration logic of its own
(retries, artifacts, logging to Prefect live in flows/).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import metadata

import pyarrow as pa
import pyarrow.compute as pc
import ray

from dedupe import clusters, exact, near
from pipeline.caption import stage as caption_stage
from pipeline.caption.stage import (
    CaptionPayload,
    CaptionWorker,
    caption_task,
    failed_partition,
)
from pipeline.executor import ActorPool, PartitionJob, StageReport, run_stage
from pipeline.ingest.reader import chunk, discover_urls, list_inputs
from pipeline.ingest.stage import (
    IngestPayload,
    ingest_partition,
    partition_fingerprint,
    url_partition_fingerprint,
)
from pipeline.partitions import (
    code_version,
    fingerprint,
    part_name,
    read_fingerprint,
    read_table,
    read_tables,
    write_table,
)
from pipeline.regions import preflight
from pipeline.regions import stage as regions_stage
from pipeline.regions.stage import RegionsPayload, RegionsWorker, regions_partition
from pipeline.shards.loader import write_wids_index
from pipeline.shards.plan import assign_shards
from pipeline.shards.stage import (
    UNFIT_REJECTS,
    SampleRules,
    ShardPayload,
    finalize_shards,
    plan_samples,
    shard_fingerprint,
    write_shard,
)
from pipeline.storage import Storage, join
from schemas.config import DedupeSection, RunConfig, redact_secrets
from schemas.tables import (
    CAPTIONS,
    GLOBAL_REGION,
    IMAGES,
    REGION_STATUS,
    REGIONS,
    REJECTS,
    CaptionStatus,
)

log = logging.getLogger("localcap")

STAGES = ("ingest", "dedupe", "regions", "caption", "shard")


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
    """(number of inputs, one job per partition): the sorted files first, then the urls table's
    partitions (URL lists and crawls, discovered once per run)."""
    entries = list_inputs(ctx.config.sources, ctx.storage)
    limits, fetch = ctx.config.ingest, ctx.config.fetch
    jobs = [
        PartitionJob(i, partition_fingerprint(part, limits), IngestPayload(part, limits, ctx.storage))
        for i, part in enumerate(chunk(entries, limits.partition_size))
    ]
    urls_dir, ingest_dir = ctx.stage_dir("urls"), ctx.stage_dir("ingest")
    url_fps, n_urls = discover_urls(ctx.config.sources, fetch, limits.max_bytes, ctx.storage, urls_dir, ctx.progress)
    # Per-host limits hold for the whole run: each of the workers running at once gets its share.
    workers = max(1, min(len(url_fps), int(ray.cluster_resources().get("CPU", 1)))) if url_fps else 1
    share = fetch.per_worker(workers)
    for k, urls_fp in enumerate(url_fps):
        i = len(jobs)
        fp = url_partition_fingerprint(urls_fp, limits, fetch)
        done = _ingest_outputs(ingest_dir, i)
        redo = _retryable(ctx.storage, done, fp) > 0
        payload = IngestPayload([], limits, ctx.storage, join(urls_dir, part_name(k)), share, done if redo else None)
        jobs.append(PartitionJob(i, fp, payload, redo))
    if any(j.redo for j in jobs):
        log.info("ingest: %d partitions recorded retryable fetch failures; fetching just those again", sum(j.redo for j in jobs))
    return len(entries) + n_urls, jobs


def _ingest_outputs(ingest_dir: str, index: int) -> tuple[str, str]:
    """(images part, rejects) files of an ingest partition."""
    return join(ingest_dir, part_name(index)), join(ingest_dir, part_name(index, "rejects"))


def _retryable(storage: Storage, done: tuple[str, str], fp: str) -> int:
    """Retryable failures recorded by a finished ingest partition of these exact inputs."""
    part, rejects = done
    if read_fingerprint(storage, part) != fp or not storage.exists(rejects):
        return 0
    return int(pc.sum(read_table(storage, rejects, columns=["retryable"])["retryable"]).as_py() or 0)


def _partial(fp: str, failures: int) -> str:
    """The fingerprint later stages see: it changes whenever a rerun fixes some of the failures."""
    return f"{fp}~{failures}-failed" if failures else fp


def run_ingest(ctx: RunContext) -> tuple[StageReport, list[str]]:
    n_inputs, jobs = ingest_jobs(ctx)
    report = run_stage("ingest", ctx.run_dir, jobs, ingest_partition, ctx.storage, progress=ctx.progress, marker="images")
    report.rows["inputs"] = n_inputs
    # Later stages must see a partition change when its retryable failures are fetched on a rerun.
    ingest_dir = ctx.stage_dir("ingest")
    return report, [_partial(j.fingerprint, _retryable(ctx.storage, _ingest_outputs(ingest_dir, j.index), j.fingerprint)
                                  if j.payload.urls_uri else 0) for j in jobs]


# -- dedupe ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DedupePayload:
    ingest_dir: str
    index_files: tuple[str, ...]  # the published hash index, minus this run's own contribution
    config: DedupeSection
    storage: Storage


DEDUPE_COLUMNS = ["uid", "sha256", "source_uri", "width", "height", "phash", "fine_sig"]


def dedupe_partition(payload: DedupePayload) -> dict[str, pa.Table]:
    cfg = payload.config
    images = read_tables(payload.storage, payload.ingest_dir, "part", IMAGES, columns=DEDUPE_COLUMNS)
    index = pa.concat_tables([read_table(payload.storage, f) for f in payload.index_files]) if payload.index_files else None
    n = images.num_rows + (index.num_rows if index is not None else 0)
    search = near.near_pairs
    if n >= cfg.distributed_min and n > 1:
        from dedupe.distributed import near_pairs_ray

        tasks = max(2, int(ray.cluster_resources().get("CPU", 2)))
        search = lambda hashes, radius: near_pairs_ray(hashes, radius, tasks)  # noqa: E731
    table, rejects = clusters.dedupe_images(images, index, cfg.exact, cfg.near, cfg.radius, cfg.fine_threshold, search)
    return {"rejects": rejects, "part": table}


def index_files(ctx: RunContext) -> list[tuple[str, int]]:
    """(uri, size) of the dataset's hash-index files written by other runs."""
    folder = ctx.config.dedupe.index
    if not folder:
        return []
    own = index_file_name(ctx.run_id)
    return [(join(folder, n), ctx.storage.size(join(folder, n))) for n in sorted(ctx.storage.list_prefix(folder))
            if n.startswith("hashes-") and n.endswith(".parquet") and n != own]


def index_file_name(run_id: str) -> str:
    return f"hashes-{run_id}.parquet"


def run_dedupe(ctx: RunContext, ingest_fingerprints: list[str]) -> StageReport:
    cfg = ctx.config.dedupe
    files = index_files(ctx)
    if not (cfg.exact or cfg.near or files):  # no jobs: also clears what an earlier attempt wrote
        return run_stage("dedupe", ctx.run_dir, [], dedupe_partition, ctx.storage, progress=False)
    fp = fingerprint("dedupe", code_version(exact, near, clusters), cfg, ingest_fingerprints, files)
    payload = DedupePayload(ctx.stage_dir("ingest"), tuple(uri for uri, _ in files), cfg, ctx.storage)
    report = run_stage("dedupe", ctx.run_dir, [PartitionJob(0, fp, payload)], dedupe_partition, ctx.storage,
                       progress=ctx.progress, marker="images")
    if files:
        report.rows["index_files"] = len(files)
    return report


def append_to_index(ctx: RunContext, manifest: pa.Table) -> int:
    """Publishing adds the kept images' hashes to the dataset's index (one file per run, so a rerun
    replaces its own contribution instead of doubling it). Returns the number of rows written."""
    if not ctx.config.dedupe.index:
        return 0
    images = read_tables(ctx.storage, ctx.stage_dir("ingest"), "part", IMAGES, columns=["uid", "phash", "fine_sig", "width", "height"])
    kept = images.filter(pc.is_in(images["uid"], value_set=pa.array(sorted(set(manifest["uid"].to_pylist())), pa.string())))
    kept = kept.group_by("uid", use_threads=False).aggregate([(c, "first") for c in ("phash", "fine_sig", "width", "height")])
    kept = kept.rename_columns(["uid", "phash", "fine_sig", "width", "height"])
    table = pa.table({**{c: kept[c] for c in kept.column_names}, "run_id": pa.array([ctx.run_id] * kept.num_rows, pa.string())})
    write_table(ctx.storage, join(ctx.config.dedupe.index, index_file_name(ctx.run_id)), table.cast(clusters.INDEX))
    return table.num_rows


def duplicate_sources(ctx: RunContext) -> set[str]:
    """Source URIs the dedupe stage dropped: later stages spend nothing on them."""
    if not ctx.storage.exists(join(ctx.stage_dir("dedupe"), part_name(0, "rejects"))):
        return set()
    dupes = read_table(ctx.storage, join(ctx.stage_dir("dedupe"), part_name(0, "rejects")), columns=["source_uri"])
    return set(dupes["source_uri"].to_pylist())


def _partition_skips(ctx: RunContext, images_uri: str, skipped: set[str]) -> frozenset[str]:
    """The dropped duplicates that are in one ingest partition (part of its later stages' fingerprints)."""
    if not skipped:
        return frozenset()
    sources = read_table(ctx.storage, images_uri, columns=["source_uri"])["source_uri"].to_pylist()
    return frozenset(skipped.intersection(sources))


# -- regions -----------------------------------------------------------------------------------
def regions_pool(ctx: RunContext) -> ActorPool | None:
    """SAM runs in long-lived GPU actors (the model loads once); the CPU proposers as plain tasks."""
    cfg = ctx.config.regions
    if not (cfg.method == "salient" and cfg.masks == "sam"):
        return None
    from pipeline.regions import sam

    size = sam.actor_count(cfg.sam)
    resources = {"num_gpus": cfg.sam.num_gpus if cfg.sam.device == "cuda" else 0, "num_cpus": 1}
    return ActorPool(lambda: RegionsWorker(cfg), size, resources)


def run_regions(ctx: RunContext, ingest_fingerprints: list[str]) -> tuple[StageReport, list[str]]:
    """(report, one fingerprint per ingest partition) for the boxes of every kept image."""
    cfg = ctx.config.regions
    if cfg.method == "none":  # no jobs: also clears what an earlier attempt with boxes wrote
        return run_stage("regions", ctx.run_dir, [], regions_partition, ctx.storage, progress=False), []
    preflight(cfg)
    skipped = duplicate_sources(ctx)
    jobs = []
    for i, ingest_fp in enumerate(ingest_fingerprints):
        images_uri = join(ctx.stage_dir("ingest"), part_name(i))
        skip = _partition_skips(ctx, images_uri, skipped)
        fp = regions_stage.partition_fingerprint(cfg, ingest_fp, skip)
        jobs.append(PartitionJob(i, fp, RegionsPayload(images_uri, skip, cfg, ctx.storage)))
    report = run_stage("regions", ctx.run_dir, jobs, regions_partition, ctx.storage, progress=ctx.progress,
                       marker="boxes", pool=regions_pool(ctx))
    return report, [j.fingerprint for j in jobs]


# -- captions ----------------------------------------------------------------------------------
def caption_pool(ctx: RunContext) -> ActorPool | None:
    """Engines (vLLM, transformers) live in long-lived actors, one per GPU (or one on CPU), placed
    by GPU count and accelerator type; the openai client is cheap and runs as plain tasks."""
    cfg = ctx.config.captioner
    if cfg.backend == "openai":
        return None
    from captioners.placement import actor_count, actor_resources

    return ActorPool(lambda: CaptionWorker(cfg), actor_count(cfg), actor_resources(cfg), on_failure=failed_partition)


def run_captions(ctx: RunContext, ingest_fingerprints: list[str], regions_fingerprints: list[str]) -> tuple[StageReport, list[str]]:
    """(report, one fingerprint per partition): one captions row per box and per global caption."""
    cfg = ctx.config.captioner
    if cfg.backend == "none":
        return run_stage("caption", ctx.run_dir, [], caption_task, ctx.storage, progress=False), []
    skipped = duplicate_sources(ctx)
    jobs = []
    for i, ingest_fp in enumerate(ingest_fingerprints):
        images_uri = join(ctx.stage_dir("ingest"), part_name(i))
        regions_uri = join(ctx.stage_dir("regions"), part_name(i)) if regions_fingerprints else None
        skip = _partition_skips(ctx, images_uri, skipped)
        fp = caption_stage.partition_fingerprint(cfg, regions_fingerprints[i] if regions_fingerprints else ingest_fp, skip)
        out_uri = join(ctx.stage_dir("caption"), part_name(i))
        redo = _backend_errors(ctx.storage, out_uri, fp) > 0
        jobs.append(PartitionJob(i, fp, CaptionPayload(images_uri, regions_uri, skip, out_uri if redo else None, cfg, ctx.storage), redo))
    if any(j.redo for j in jobs):
        log.info("caption: %d partitions recorded back-end errors; captioning what failed again", sum(j.redo for j in jobs))
    report = run_stage("caption", ctx.run_dir, jobs, caption_task, ctx.storage, progress=ctx.progress, marker="captions",
                       pool=caption_pool(ctx))
    # Later stages must see a partition change when its failures are captioned on a rerun.
    caption_dir = ctx.stage_dir("caption")
    return report, [_partial(j.fingerprint, _backend_errors(ctx.storage, join(caption_dir, part_name(j.index)), j.fingerprint))
                    for j in jobs]


def _backend_errors(storage: Storage, uri: str, fp: str) -> int:
    """Back-end errors recorded by an existing captions partition of these exact inputs."""
    if not storage.exists(uri) or read_fingerprint(storage, uri) != fp:
        return 0
    status = read_table(storage, uri, columns=["status"])["status"]
    return int(pc.sum(pc.equal(status, CaptionStatus.BACKEND_ERROR.value)).as_py() or 0)


# -- shards ------------------------------------------------------------------------------------
def run_shards(ctx: RunContext, ingest_fingerprints: list[str], regions_fingerprints: list[str],
               caption_fingerprints: list[str]) -> StageReport:
    cfg, captioner = ctx.config.shards, ctx.config.captioner
    rules = SampleRules(cfg, (ctx.config.dedupe.box_iou, ctx.config.dedupe.caption_similarity),
                        need_global=captioner.backend != "none" and captioner.global_caption)
    samples, unfit = plan_samples(ctx.storage, ctx.stage_dir("ingest"), len(ingest_fingerprints), duplicate_sources(ctx),
                                  ctx.stage_dir("regions") if regions_fingerprints else None,
                                  ctx.stage_dir("caption") if caption_fingerprints else None, rules)
    # Rewritten by every run from the plan, so it always matches the shards below.
    write_table(ctx.storage, join(ctx.stage_dir("shard"), UNFIT_REJECTS), unfit)
    if unfit.num_rows:
        log.info("shard: %d images left out that PS3's loader could not train on %s (shards.keep_empty writes them)",
                 unfit.num_rows, dict(sorted(Counter(unfit["reason"].to_pylist()).items())))
    groups = assign_shards(samples, cfg.max_samples, cfg.max_bytes, combined=cfg.layout == "combined")
    fps = {i: (fp, regions_fingerprints[i] if regions_fingerprints else None, caption_fingerprints[i] if caption_fingerprints else None)
           for i, fp in enumerate(ingest_fingerprints)}
    jobs = []
    for i, group in enumerate(groups):
        payload = ShardPayload(i, group, ctx.stage_dir("ingest"), cfg, ctx.storage)
        jobs.append(PartitionJob(i, shard_fingerprint(payload, fps), payload))
    report = run_stage("shard", ctx.run_dir, jobs, write_shard, ctx.storage, progress=ctx.progress, marker="samples",
                       outputs=[cfg.output])  # a killed run's half-written tars go before new ones are written
    if unfit.num_rows:
        report.rows["rejects"] = unfit.num_rows
    return report


# -- the dataset files -------------------------------------------------------------------------
def collect_rejects(ctx: RunContext) -> pa.Table:
    tables = [read_tables(ctx.storage, ctx.stage_dir(s), "rejects", REJECTS) for s in STAGES]
    return pa.concat_tables(tables)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("localcap", "ray", "prefect", "pyarrow", "pillow", "webdataset", "imagehash", "pydantic", "scikit-image"):
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


def dataset_statistics(manifest: pa.Table, regions: pa.Table, status: pa.Table) -> dict:
    """Sizes, boxes per image, box sides as fractions of the image's short side, and why images
    got no boxes; regions and status hold the kept samples' rows of those stage tables. Only facts
    about the data: a resumed run writes the same statistics as an uninterrupted one."""
    widths, heights = manifest["width"].to_pylist(), manifest["height"].to_pylist()
    short = {uid: min(w, h) for uid, w, h in zip(manifest["uid"].to_pylist(), widths, heights)}
    box_w, box_h = [], []
    for uid, (x1, y1, x2, y2) in zip(regions["uid"].to_pylist(), regions["box"].to_pylist()):
        box_w.append(round((x2 - x1) / short[uid], 4))
        box_h.append(round((y2 - y1) / short[uid], 4))
    no_box: dict[str, int] = {}
    for reason in status["reason"].to_pylist():
        if reason is not None:
            no_box[reason] = no_box.get(reason, 0) + 1
    return {
        "width": _stats(widths),
        "height": _stats(heights),
        "megapixels": _stats([round(w * h / 1e6, 3) for w, h in zip(widths, heights)]),
        "boxes_per_image": _stats(manifest["boxes"].to_pylist()),
        "box_width_fraction": _stats(box_w),
        "box_height_fraction": _stats(box_h),
        "no_boxes_by_reason": dict(sorted(no_box.items())),
    }


def build_entry(run_id: str, reports: list[StageReport]) -> dict:
    """One run's record: what each stage computed or skipped, and how long it took."""
    return {"run_id": run_id, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "computed": sum(r.computed for r in reports), "stages": [asdict(r) for r in reports]}


def previous_builds(storage: Storage, run_dir: str) -> list[dict]:
    """The build records of the earlier runs of this run id (its run.json), oldest first."""
    uri = join(run_dir, "run.json")
    if not storage.exists(uri):
        return []
    record = json.loads(storage.read_bytes(uri))
    if "builds" in record:
        return record["builds"]
    return [{"run_id": record.get("run_id"), "finished_at": record.get("finished_at"),
             "computed": sum(st.get("computed", 0) for st in record.get("stages", [])), "stages": record.get("stages", [])}]


def run_timings(builds: list[dict], status: pa.Table) -> dict:
    """What building the data cost: per stage, the seconds of every run that computed part of it
    (a rerun that skips everything adds nothing), and the proposer's per-image times."""
    seconds: dict[str, float] = {}
    for entry in builds:
        for st in entry["stages"]:
            seconds.setdefault(st["stage"], 0.0)
            if st.get("computed"):
                seconds[st["stage"]] = round(seconds[st["stage"]] + st["seconds"], 3)
    out: dict = {"stage_seconds": seconds, "runs": len(builds), "runs_that_computed": sum(1 for b in builds if b["computed"])}
    if status.num_rows:
        out["regions_ms_per_image"] = {c.removesuffix("_ms"): round(float(pc.mean(status[c]).as_py() or 0.0), 2)
                                       for c in ("decode_ms", "segment_ms", "score_ms")}
    return out


def caption_summary(cfg, captions: pa.Table) -> dict:
    """Provenance and counts of the run's captions: every image that reached captioning, including
    those the shard stage then left out for want of an accepted caption (their failures count)."""
    by_status: dict[str, int] = {}
    for item in pc.value_counts(captions["status"]).to_pylist() if captions.num_rows else []:
        by_status[item["values"]] = item["counts"]
    return {
        "backend": cfg.backend,
        "model": cfg.model_ref,
        "models_seen": sorted(set(captions["model"].to_pylist())),
        "prompt_id": cfg.prompt_id,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed},
        "max_pixels": cfg.max_pixels,
        "total": captions.num_rows,
        "by_status": dict(sorted(by_status.items())),
        "global_captions": int(pc.sum(pc.and_(pc.equal(captions["region_id"], GLOBAL_REGION), pc.equal(captions["status"], "ok"))).as_py() or 0),
        "generated_tokens": int(pc.sum(captions["n_tokens"]).as_py() or 0),
        "prompt_tokens": int(pc.sum(captions["prompt_tokens"]).as_py() or 0),
    }


def kept_region_tables(ctx: RunContext, manifest: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(regions, region_status) rows of the images that became samples."""
    regions = read_tables(ctx.storage, ctx.stage_dir("regions"), "part", REGIONS)
    status = read_tables(ctx.storage, ctx.stage_dir("regions"), "status", REGION_STATUS)
    uids = pa.array(sorted(set(manifest["uid"].to_pylist())), pa.string())
    return (regions.filter(pc.is_in(regions["uid"], value_set=uids)),
            status.filter(pc.is_in(status["uid"], value_set=uids)))


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
    write_wids_index(ctx.storage, ctx.config.shards.output, ctx.config.shards.layout, ctx.config.run.name)
    rejects = collect_rejects(ctx)
    counts = count_summary(n_inputs, manifest, rejects)
    regions, status = kept_region_tables(ctx, manifest)
    captions = read_tables(ctx.storage, ctx.stage_dir("caption"), "part", CAPTIONS) if ctx.config.captioner.backend != "none" else None
    if captions is not None:  # boxes whose caption was rejected are not in the shards
        ok = captions.filter(pc.and_(pc.equal(captions["status"], "ok"), pc.greater_equal(captions["region_id"], 0)))
        keys = pa.array(sorted({f"{u}/{r}" for u, r in zip(ok["uid"].to_pylist(), ok["region_id"].to_pylist())}), pa.string())
        region_keys = pc.binary_join_element_wise(regions["uid"], pc.cast(regions["region_id"], pa.string()), "/")
        regions = regions.filter(pc.is_in(region_keys, value_set=keys))
    builds = previous_builds(ctx.storage, ctx.run_dir) + [build_entry(ctx.run_id, reports)]
    built = [b for b in builds if b["computed"]] or builds
    dataset = {
        "name": ctx.config.run.name,
        "run_id": ctx.run_id,
        "layout": ctx.config.shards.layout,
        "created_at": built[-1]["finished_at"],  # when the data last changed, not when a no-op rerun rewrote this file
        "updated_at": builds[-1]["finished_at"],
        "counts": counts,
        "statistics": dataset_statistics(manifest, regions, status),
        "timings": run_timings(builds, status),
        "builds": builds,
        "captions": caption_summary(ctx.config.captioner, captions) if captions is not None else None,
        "versions": package_versions(),
        "config": redact_secrets(ctx.config.model_dump(mode="json")),  # no credential in records or published files
    }
    write_table(ctx.storage, join(ctx.config.shards.output, "rejects.parquet"), rejects)
    ctx.storage.write_bytes(join(ctx.config.shards.output, "dataset.json"), json.dumps(dataset, indent=1).encode())
    indexed = append_to_index(ctx, manifest)  # after the dataset is whole: the index never names a half-written one
    run_record = {
        "run_id": ctx.run_id,
        "finished_at": dataset["updated_at"],
        "config": dataset["config"],
        "versions": dataset["versions"],
        "stages": [asdict(r) for r in reports],  # this run's; `builds` holds every run's
        "builds": builds,
        "counts": counts,
        "index_rows_appended": indexed,
    }
    ctx.storage.write_bytes(join(ctx.run_dir, "run.json"), json.dumps(run_record, indent=1).encode())
    return dataset
