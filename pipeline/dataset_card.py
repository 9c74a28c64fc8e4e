"""The dataset card: what a build writes beside the shards once every stage is done.

dataset.json (counts, statistics, timings, every build's record, caption provenance, package
versions, the redacted config), rejects.parquet, manifest.parquet, hashes.parquet (the samples'
perceptual hashes, which publishing adds to the dataset's index), sizes.json and the wids indexes;
run.json in the run folder. Only facts about the data go into the statistics, so a resumed run
writes the same card as an uninterrupted one (but for times).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from importlib import metadata

import pyarrow as pa
import pyarrow.compute as pc

from dedupe.index import HASH_COLUMNS, kept_hashes
from pipeline.dataset_format import DATASET, HASHES_FILE, REJECTS_FILE
from pipeline.executor import StageReport
from pipeline.versions import value_counts, value_summary
from pipeline.partitions import read_tables, write_table
from pipeline.shards.wids import write_wids_index
from pipeline.shards.stage import finalize_shards, sample_boxes, sample_rules
from pipeline.stage import RunContext, stages_for
from pipeline.storage import Storage, join
from schemas.config import redact_secrets
from schemas.tables import (
    CAPTIONS,
    DEDUPE,
    GLOBAL_REGION,
    IMAGES,
    REGION_STATUS,
    REGIONS,
    REJECTS,
)


def collect_rejects(ctx: RunContext) -> pa.Table:
    """The rejects of every stage of the run, in stage order."""
    tables = [read_tables(ctx.storage, ctx.stage_dir(cls.name), "rejects", REJECTS) for cls in stages_for(ctx.config)]
    return pa.concat_tables(tables)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("localcap", "ray", "prefect", "pyarrow", "pillow", "webdataset", "imagehash", "pydantic", "scikit-image"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def dataset_statistics(manifest: pa.Table, boxes: list[tuple[int, list[int]]], status: pa.Table,
                       duplicates: pa.Table | None = None) -> dict:
    """Sizes, boxes per image (and how many images have each count), box sides as fractions of the
    image's short side, why images got no boxes, and how the dropped duplicates matched; boxes are
    (image short side, box) of every box in the samples, status the kept samples' region_status rows,
    duplicates the dedupe tables. Only facts about the data: a resumed run writes the same statistics
    as an uninterrupted one."""
    widths, heights = manifest["width"].to_pylist(), manifest["height"].to_pylist()
    box_w = [round((x2 - x1) / short, 4) for short, (x1, _, x2, _) in boxes]
    box_h = [round((y2 - y1) / short, 4) for short, (_, y1, _, y2) in boxes]
    no_box: dict[str, int] = {}
    for reason in status["reason"].to_pylist():
        if reason is not None:
            no_box[reason] = no_box.get(reason, 0) + 1
    return {
        "width": value_summary(widths),
        "height": value_summary(heights),
        "megapixels": value_summary([round(w * h / 1e6, 3) for w, h in zip(widths, heights)]),
        "boxes_per_image": value_summary(manifest["boxes"].to_pylist()),
        "images_by_box_count": value_counts(manifest["boxes"].to_pylist()),
        "box_width_fraction": value_summary(box_w),
        "box_height_fraction": value_summary(box_h),
        "no_boxes_by_reason": dict(sorted(no_box.items())),
        "box_side_fraction_by_size": value_counts([_size_bucket(max(w, h)) for w, h in zip(box_w, box_h)]),
        "duplicates_by_match": value_counts(duplicates.filter(pc.invert(duplicates["kept"]))["match"].to_pylist()
                                       if duplicates is not None and duplicates.num_rows and "match" in duplicates.column_names else []),
    }


SIZE_BUCKETS = (0.125, 0.25, 0.5)  # box long side / image short side: small, medium, large, very large


def _size_bucket(fraction: float) -> str:
    edges = ("0", *map(str, SIZE_BUCKETS))
    for low, high in zip(edges, SIZE_BUCKETS):
        if fraction < high:
            return f"{low}-{high}"
    return f">={SIZE_BUCKETS[-1]}"


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
    """What building the data cost: per stage, the seconds of every attempt of this run id that had
    work to do (the newest build's stage totals; killed attempts included), and the proposer's
    per-image times."""
    seconds = {st["stage"]: st.get("total_seconds", st["seconds"] if st.get("computed") else 0.0)
               for st in (builds[-1]["stages"] if builds else [])}
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


def write_dataset_card(ctx: RunContext, n_inputs: int, reports: list[StageReport]) -> dict:
    """Finish the build: manifest.parquet, hashes.parquet, sizes.json, the wids indexes and
    rejects.parquet, then dataset.json last; run.json into the run directory. The dataset's hash
    index is not touched: only publishing a version changes it.
    Returns dataset.json's content."""
    manifest = finalize_shards(ctx.storage, ctx.run_dir, ctx.config.shards)
    write_wids_index(ctx.storage, ctx.config.shards.output, ctx.config.shards.layout, ctx.config.run.name)
    rejects = collect_rejects(ctx)
    counts = count_summary(n_inputs, manifest, rejects)
    regions, status = kept_region_tables(ctx, manifest)
    captions = read_tables(ctx.storage, ctx.stage_dir("caption"), "part", CAPTIONS) if ctx.config.captioner.backend != "none" else None
    boxes = sample_boxes(sample_rules(ctx.config), manifest, regions, captions)
    builds = previous_builds(ctx.storage, ctx.run_dir) + [build_entry(ctx.run_id, reports)]
    built = [b for b in builds if b["computed"]] or builds
    dataset = {
        "name": ctx.config.run.name,
        "run_id": ctx.run_id,
        "layout": ctx.config.shards.layout,
        "created_at": built[-1]["finished_at"],  # when the data last changed, not when a no-op rerun rewrote this file
        "updated_at": builds[-1]["finished_at"],
        "counts": counts,
        "statistics": dataset_statistics(manifest, boxes, status, read_tables(ctx.storage, ctx.stage_dir("dedupe"), "part", DEDUPE)),
        "timings": run_timings(builds, status),
        "builds": builds,
        "captions": caption_summary(ctx.config.captioner, captions) if captions is not None else None,
        "versions": package_versions(),
        "config": redact_secrets(ctx.config.model_dump(mode="json")),  # no credential in records or published files
    }
    images = read_tables(ctx.storage, ctx.stage_dir("ingest"), "part", IMAGES, columns=HASH_COLUMNS)
    hashes = kept_hashes(images, manifest["uid"].to_pylist(), ctx.run_id)
    write_table(ctx.storage, join(ctx.config.shards.output, HASHES_FILE), hashes)
    write_table(ctx.storage, join(ctx.config.shards.output, REJECTS_FILE), rejects)
    ctx.storage.write_bytes(join(ctx.config.shards.output, DATASET), json.dumps(dataset, indent=1).encode())
    run_record = {
        "run_id": ctx.run_id,
        "finished_at": dataset["updated_at"],
        "config": dataset["config"],
        "versions": dataset["versions"],
        "stages": [asdict(r) for r in reports],  # this run's; `builds` holds every run's
        "builds": builds,
        "counts": counts,
        "hashes": hashes.num_rows,
    }
    ctx.storage.write_bytes(join(ctx.run_dir, "run.json"), json.dumps(run_record, indent=1).encode())
    return dataset
