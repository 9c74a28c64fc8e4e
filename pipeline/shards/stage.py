"""The shard stage: plan shards from the kept images, write each shard's tars, then the dataset files."""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import pyarrow as pa

from dedupe.regions import iou, kept_boxes
from pipeline.dedupe.stage import dropped_sources
from pipeline.partitions import part_name, read_table, read_tables, write_table
from pipeline.regions.stage import boxes_by_uid, read_boxes
from pipeline.shards import writer
from pipeline.dataset_format import IMAGE_EXT, SIZES, TAR_SUFFIX, shard_files, tar_sample_counts
from pipeline.shards.plan import SampleRef, assign_shards
from pipeline.stage import Partition, Stage, StageResult
from pipeline.storage import Storage, join
from schemas.config import RunConfig, ShardsSection
from schemas.sample import TextBoxSample
from schemas.tables import (
    GLOBAL_REGION,
    MANIFEST,
    REJECTS,
    RejectReason,
    reject,
    rows_to_table,
)

STAGE = "shard"
log = logging.getLogger("localcap")
UNFIT_REJECTS = "rejects-plan.parquet"  # in the shard stage folder: images the plan left out (not a partition)
PLAN_COLUMNS = ["uid", "source_uri", "n_bytes", "width", "height"]


@dataclass(frozen=True)
class ShardPayload:
    index: int
    samples: list[SampleRef]  # with their JSON: the shard only adds the image bytes
    ingest_dir: str
    config: ShardsSection
    storage: Storage


@dataclass(frozen=True)
class SampleRules:
    """What the plan needs besides the stage tables to decide each sample's JSON."""

    config: ShardsSection
    box_dedupe: tuple[float, float] = (0.7, 0.9)  # (dedupe.box_iou, dedupe.caption_similarity)
    need_global: bool = False  # captioning with global captions is on: a sample without one cannot train


def sample_rules(config: RunConfig) -> SampleRules:
    """The rules of a run's config: one place, so the plan and the dataset card's statistics agree."""
    return SampleRules(config.shards, (config.dedupe.box_iou, config.dedupe.caption_similarity),
                       need_global=config.captioner.backend != "none" and config.captioner.global_caption)


def sample_boxes(rules: SampleRules, manifest: pa.Table, regions: pa.Table,
                 captions: pa.Table | None) -> list[tuple[int, list[int]]]:
    """(image short side, box) of every box the samples of `manifest` hold, as build_sample keeps
    them (crop filter, box dedupe, rejected captions), from the regions and captions tables: the
    statistics then describe what a trainer reads, not what the regions stage proposed."""
    boxes, texts = boxes_by_uid(regions), None if captions is None else ok_captions(captions)
    out = []
    for uid, width, height in zip(*(manifest[c].to_pylist() for c in ("uid", "width", "height"))):
        sample = build_sample(rules, boxes.get(uid, []), width, height, None if texts is None else texts.get(uid, {}))
        out.extend((min(width, height), box) for box in sample.box)
    return out


def plan_samples(storage: Storage, ingest_dir: str, n_partitions: int, excluded_uris: set[str], regions_dir: str | None,
                 captions_dir: str | None, rules: SampleRules) -> tuple[list[SampleRef], pa.Table]:
    """(kept samples in ingest order (partition, then row) with their text_box JSON, rejects of the
    images PS3's loader could not train on). Only the small tables are read, never image bytes."""
    refs, rejects = [], []
    for p in range(n_partitions):
        t = read_table(storage, join(ingest_dir, part_name(p)), columns=PLAN_COLUMNS)
        boxes = read_boxes(storage, join(regions_dir, part_name(p)) if regions_dir else None)
        no_box_why = read_no_box_reasons(storage, join(regions_dir, part_name(p, "status")) if regions_dir else None)
        captions = read_captions(storage, captions_dir, p)
        columns = (t[c].to_pylist() for c in PLAN_COLUMNS)
        for row, (uid, uri, n, width, height) in enumerate(zip(*columns)):
            if uri in excluded_uris:
                continue
            sample = build_sample(rules, boxes.get(uid, []), width, height, None if captions is None else captions.get(uid, {}))
            unfit = None if rules.config.keep_empty else unfit_reason(sample, captions is not None, rules.need_global)
            if unfit:
                why = f"regions found none ({no_box_why[uid]}); " if unfit == RejectReason.NO_BOXES and uid in no_box_why else ""
                rejects.append(reject(uri, uid, STAGE, unfit, why + UNFIT_DETAIL[unfit]))
            else:
                refs.append(SampleRef(uid, p, row, n, sample.to_json_bytes(), len(sample.box)))
    return refs, rows_to_table(rejects, REJECTS)


UNFIT_DETAIL = {
    RejectReason.NO_BOXES: "no box with a caption: PS3's loader would divide by zero merging its texts (shards.keep_empty writes it anyway)",
    RejectReason.NO_GLOBAL_CAPTION: "no global caption: PS3's loader needs one whenever it draws the global view (shards.keep_empty writes it anyway)",
}


def read_no_box_reasons(storage: Storage, status_uri: str | None) -> dict[str, str]:
    """uid -> why the regions stage found no box (too_small, too_plain, ...), from one status table."""
    if status_uri is None or not storage.exists(status_uri):
        return {}
    t = read_table(storage, status_uri, columns=["uid", "reason"])
    return {u: r for u, r in zip(t["uid"].to_pylist(), t["reason"].to_pylist()) if r}


def unfit_reason(sample: TextBoxSample, captioned: bool, need_global: bool) -> RejectReason | None:
    """Why PS3's loader could not train on this sample (None: it can). It draws either the global
    caption or boxes with their texts, so it needs a box (with a caption, when captioning ran) and,
    when captioning with global captions ran, a global caption."""
    if not sample.box or (captioned and not any(t.strip() for t in sample.text)):
        return RejectReason.NO_BOXES
    if need_global and not (sample.global_text or "").strip():
        return RejectReason.NO_GLOBAL_CAPTION
    return None


def shard_key(payload: ShardPayload, partition_fingerprints: dict[int, tuple]) -> list:
    """Changes when the shard's plan (samples and their JSON), its config, or any input partition changes."""
    used = sorted({s.partition for s in payload.samples})
    return [payload.config.model_dump(mode="json"), payload.index,
            [(s.key, s.partition, s.row, s.text_json.decode()) for s in payload.samples],
            [partition_fingerprints[p] for p in used]]


def build_sample(rules: SampleRules, boxes: list[list[int]], width: int, height: int,
                 captions: dict[int, str] | None = None) -> TextBoxSample:
    """The text_box sample of an image.

    Without a captioner (captions None) every box is kept with text "" (PS3's format needs one text
    per box; "" says "not captioned" without inventing words). With one, a box whose caption was
    rejected or failed is dropped with it, and `global_text` is the global caption when it passed.
    A box that PS3's crop can cut away entirely is dropped too (see always_cropped_in)."""
    seen = always_cropped_in(width, height)
    pairs = [("" if captions is None else captions[i], b) for i, b in enumerate(boxes)
             if (captions is None or i in captions) and iou(b, seen) > 0]
    texts, kept = [t for t, _ in pairs], [b for _, b in pairs]
    keep = kept_boxes(kept, texts, *rules.box_dedupe)  # boxes that repeat a kept box, by overlap or by caption, go
    texts, kept = [texts[i] for i in keep], [kept[i] for i in keep]
    sample = TextBoxSample(text=texts, box=kept, global_text=(captions or {}).get(GLOBAL_REGION), type=rules.config.sample_type)
    sample.check_inside(width, height)
    return sample


PS3_CROP_SCALE, PS3_CROP_RATIO = 0.9, 4 / 3  # PS3's RandomResizedCrop(scale=(0.9, 1)), torchvision's ratio (3/4, 4/3)


def always_cropped_in(width: int, height: int) -> tuple[float, float, float, float]:
    """The part of the image every crop of PS3's loader keeps. A crop within the ratio range keeps at
    least 90% of each side, so the central part inside a 10% margin on every side is always in it;
    an image wider (taller) than 4:3 (3:4) gets torchvision's fallback, a centred 4:3 crop of the full
    height (width). A box outside this region can leave PS3 a selection map with nothing of the box."""
    if width > height * PS3_CROP_RATIO:
        w = height * PS3_CROP_RATIO
        return ((width - w) / 2, 0.0, (width + w) / 2, float(height))
    if height > width * PS3_CROP_RATIO:
        h = width * PS3_CROP_RATIO
        return (0.0, (height - h) / 2, float(width), (height + h) / 2)
    mx, my = width * (1 - PS3_CROP_SCALE), height * (1 - PS3_CROP_SCALE)
    return (mx, my, width - mx, height - my)


def read_captions(storage: Storage, captions_dir: str | None, partition: int) -> dict[str, dict[int, str]] | None:
    """uid -> {region_id: cleaned text} of the ok captions of one partition (None: no captioner)."""
    if captions_dir is None:
        return None
    return ok_captions(read_table(storage, join(captions_dir, part_name(partition)), columns=["uid", "region_id", "text", "status"]))


def ok_captions(captions: pa.Table) -> dict[str, dict[int, str]]:
    """uid -> {region_id: cleaned text} of a captions table's ok rows."""
    out: dict[str, dict[int, str]] = defaultdict(dict)
    for uid, rid, text, status in zip(*(captions[c].to_pylist() for c in ("uid", "region_id", "text", "status"))):
        if status == "ok":
            out[uid][rid] = text
    return out


def write_shard(payload: ShardPayload) -> dict[str, pa.Table]:
    """The shard's tars from the planned samples: image bytes from the ingest tables, JSON from the plan."""
    by_partition: dict[int, list[int]] = defaultdict(list)
    for s in payload.samples:
        by_partition[s.partition].append(s.row)
    rows: dict[tuple[int, int], dict] = {}
    for p, wanted in by_partition.items():
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
        texts.append((f"{s.key}.json", s.text_json))
        manifest.append({"key": s.key, "uid": rec["uid"], "shard": f"{first_folder}/{first_file}", "source": rec["source_uri"],
                         "width": rec["width"], "height": rec["height"], "boxes": s.boxes})

    if cfg.layout == "paired":
        members = {"image": images, "text_box": texts}
    else:
        members = {"combined": [m for pair in zip(images, texts) for m in pair]}
    for folder, name in files.items():
        with payload.storage.atomic_path(join(cfg.output, folder, name)) as tmp:
            writer.write_tar(tmp, members[folder])
    return {"part": rows_to_table(manifest, MANIFEST)}


class ShardStage(Stage):
    """Plans the samples from the small stage tables (never the image bytes), leaves out what PS3's
    loader could not train on (rejects-plan.parquet), cuts the rest into shards and writes each
    shard's tars into shards.output."""

    name = STAGE
    needs = ("ingest", "dedupe", "regions", "caption")
    outputs = {"part": MANIFEST}
    marker = "samples"

    def external_outputs(self) -> list[str]:
        return [self.config.shards.output]  # a killed run's half-written tars go before new ones are written

    def partitions(self, inputs: dict[str, StageResult]) -> list[Partition]:
        cfg = self.config.shards
        ingest, regions, captions = inputs["ingest"], inputs["regions"], inputs["caption"]
        rules = sample_rules(self.config)
        samples, unfit = plan_samples(self.storage, self.ctx.stage_dir("ingest"), len(ingest.fingerprints), dropped_sources(self.ctx),
                                      self.ctx.stage_dir("regions") if regions.on else None,
                                      self.ctx.stage_dir("caption") if captions.on else None, rules)
        # Rewritten by every run from the plan, so it always matches the shards below.
        write_table(self.storage, join(self.folder, UNFIT_REJECTS), unfit)
        if unfit.num_rows:
            log.info("shard: %d images left out that PS3's loader could not train on %s (shards.keep_empty writes them)",
                     unfit.num_rows, dict(sorted(Counter(unfit["reason"].to_pylist()).items())))
        self.unfit = unfit.num_rows
        groups = assign_shards(samples, cfg.max_samples, cfg.max_bytes, combined=cfg.layout == "combined")
        fps = {i: (fp, regions.fingerprints[i] if regions.on else None, captions.fingerprints[i] if captions.on else None)
               for i, fp in enumerate(ingest.fingerprints)}
        out = []
        for i, group in enumerate(groups):
            payload = ShardPayload(i, group, self.ctx.stage_dir("ingest"), cfg, self.storage)
            out.append(Partition(shard_key(payload, fps), payload))
        return out

    def process(self, payload: ShardPayload) -> dict[str, pa.Table]:
        return write_shard(payload)

    def finish(self, report, inputs) -> None:
        if self.unfit:
            report.rows["rejects"] = self.unfit


def finalize_shards(storage: Storage, run_dir: str, config: ShardsSection) -> pa.Table:
    """manifest.parquet and sizes.json from the shard partitions; tars no plan names are removed."""
    manifest = read_tables(storage, join(run_dir, STAGE), "part", MANIFEST)
    sizes = tar_sample_counts(manifest, config.layout)
    for folder, counts in sizes.items():
        folder_uri = join(config.output, folder)
        for stale in storage.list_prefix(folder_uri):
            if stale.endswith(TAR_SUFFIX) and stale not in counts:
                storage.delete(join(folder_uri, stale))
        storage.write_bytes(join(folder_uri, SIZES), json.dumps(counts, indent=1, sort_keys=True).encode())
    write_table(storage, join(config.output, "manifest.parquet"), manifest)
    return manifest
