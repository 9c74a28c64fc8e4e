"""The shard stage: plan shards from the kept images, write each shard's tars, then the dataset files."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.partitions import code_version, fingerprint, part_name, read_table, read_tables, write_table
from pipeline.shards import layout as layout_mod
from pipeline.shards import plan as plan_mod
from pipeline.shards import writer
from pipeline.shards.layout import IMAGE_EXT, folders, shard_files
from pipeline.shards.plan import SampleRef
from pipeline.storage import Storage, join
from schemas.config import ShardsSection
from schemas.sample import TextBoxSample
from schemas.tables import MANIFEST, rows_to_table

STAGE = "shard"
CODE_VERSION = code_version(layout_mod, plan_mod, writer, sys.modules[__name__])
PLAN_COLUMNS = ["uid", "source_uri", "n_bytes"]


@dataclass(frozen=True)
class ShardPayload:
    index: int
    samples: list[SampleRef]
    ingest_dir: str
    regions_dir: str | None  # None: the run proposes no boxes
    config: ShardsSection
    storage: Storage


def plan_samples(storage: Storage, ingest_dir: str, n_partitions: int, excluded_uris: set[str]) -> list[SampleRef]:
    """Kept images in ingest order (partition, then row), keyed by uid."""
    refs = []
    for p in range(n_partitions):
        t = read_table(storage, join(ingest_dir, part_name(p)), columns=PLAN_COLUMNS)
        for row, (uid, uri, n) in enumerate(zip(t["uid"].to_pylist(), t["source_uri"].to_pylist(), t["n_bytes"].to_pylist())):
            if uri not in excluded_uris:
                refs.append(SampleRef(uid, p, row, n))
    return refs


def shard_fingerprint(payload: ShardPayload, partition_fingerprints: dict[int, tuple]) -> str:
    """Changes when the shard's plan, its config, or any input partition (images, boxes) changes."""
    used = sorted({s.partition for s in payload.samples})
    return fingerprint(STAGE, CODE_VERSION, payload.config, payload.index, [(s.key, s.partition, s.row) for s in payload.samples],
                       [partition_fingerprints[p] for p in used])


def sample_json(config: ShardsSection, boxes: list[list[int]], width: int, height: int) -> bytes:
    """The text_box JSON of a sample. Until a captioner runs, each box's text is "" (the PS3 format
    needs one text per box; an empty string says "not captioned" without inventing words)."""
    sample = TextBoxSample(text=[""] * len(boxes), box=boxes, type=config.sample_type)
    sample.check_inside(width, height)
    return sample.to_json_bytes()


def read_boxes(storage: Storage, regions_dir: str | None, partition: int) -> dict[str, list[list[int]]]:
    """uid -> boxes in region_id order, for one partition's regions table."""
    if regions_dir is None:
        return {}
    t = read_table(storage, join(regions_dir, part_name(partition)), columns=["uid", "region_id", "box"])
    out: dict[str, list[tuple[int, list[int]]]] = defaultdict(list)
    for uid, rid, box in zip(t["uid"].to_pylist(), t["region_id"].to_pylist(), t["box"].to_pylist()):
        out[uid].append((rid, box))
    return {uid: [b for _, b in sorted(items)] for uid, items in out.items()}


def write_shard(payload: ShardPayload) -> dict[str, pa.Table]:
    by_partition: dict[int, list[int]] = defaultdict(list)
    for s in payload.samples:
        by_partition[s.partition].append(s.row)
    rows: dict[tuple[int, int], dict] = {}
    boxes: dict[str, list[list[int]]] = {}
    for p, wanted in by_partition.items():
        boxes.update(read_boxes(payload.storage, payload.regions_dir, p))
        table = read_table(payload.storage, join(payload.ingest_dir, part_name(p)),
                           columns=["uid", "source_uri", "width", "height", "format", "image"])
        picked = table.take(pa.array(wanted))
        for r, rec in zip(wanted, picked.to_pylist()):
            rows[(p, r)] = rec

    cfg = payload.config
    files = shard_files(cfg.layout, payload.index)
    first_folder, first_file = next(iter(files.items()))
    images, texts, manifest = [], [], []
    for s in payload.samples:
        rec = rows[(s.partition, s.row)]
        assert rec["uid"] == s.key, f"ingest partition {s.partition} changed under the shard plan"
        images.append((f"{s.key}.{IMAGE_EXT[rec['format']]}", rec["image"]))
        sample_boxes = boxes.get(rec["uid"], [])
        texts.append((f"{s.key}.json", sample_json(cfg, sample_boxes, rec["width"], rec["height"])))
        manifest.append({"key": s.key, "uid": rec["uid"], "shard": f"{first_folder}/{first_file}", "source": rec["source_uri"],
                         "width": rec["width"], "height": rec["height"], "boxes": len(sample_boxes)})

    if cfg.layout == "paired":
        members = {"image": images, "text_box": texts}
    else:
        members = {"combined": [m for pair in zip(images, texts) for m in pair]}
    for folder, name in files.items():
        with payload.storage.atomic_path(join(cfg.output, folder, name)) as tmp:
            writer.write_tar(tmp, members[folder])
    return {"part": rows_to_table(manifest, MANIFEST)}


def tar_sample_counts(manifest: pa.Table, layout: str) -> dict[str, dict[str, int]]:
    """sizes.json contents per folder: tar file name -> number of samples."""
    out: dict[str, dict[str, int]] = {f: {} for f in folders(layout)}
    if manifest.num_rows == 0:
        return out
    counts = pc.value_counts(manifest["shard"]).to_pylist()
    for item in sorted(counts, key=lambda c: c["values"]):
        index = int(item["values"].rsplit("_", 1)[1].split(".")[0])
        for folder, name in shard_files(layout, index).items():
            out[folder][name] = item["counts"]
    return out


def finalize_shards(storage: Storage, run_dir: str, config: ShardsSection) -> pa.Table:
    """manifest.parquet and sizes.json from the shard partitions; tars no plan names are removed."""
    manifest = read_tables(storage, join(run_dir, STAGE), "part", MANIFEST)
    sizes = tar_sample_counts(manifest, config.layout)
    for folder, counts in sizes.items():
        folder_uri = join(config.output, folder)
        for stale in storage.list_prefix(folder_uri):
            if stale.endswith(".tar") and stale not in counts:
                storage.delete(join(folder_uri, stale))
        storage.write_bytes(join(folder_uri, "sizes.json"), json.dumps(counts, indent=1, sort_keys=True).encode())
    write_table(storage, join(config.output, "manifest.parquet"), manifest)
    return manifest
