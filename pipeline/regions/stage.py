"""The regions stage: one ingest partition in, its boxes (regions table) and per-image outcome
(region_status table) out. Duplicates found by the dedupe stage are skipped: no work is spent on
an image that will not be a sample."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa

from pipeline.dedupe.stage import partition_skips
from pipeline.partitions import part_name, read_table
from pipeline.regions import preflight
from pipeline.regions.proposers import Proposer, make_proposer, propose_safely
from pipeline.stage import Actors, Partition, Stage, StageResult, Tasks
from pipeline.storage import Storage, join
from schemas.config import RegionsSection
from schemas.tables import REGION_STATUS, REGIONS, rows_to_table

STAGE = "regions"


@dataclass(frozen=True)
class RegionsPayload:
    images_uri: str  # an ingest partition
    skip_sources: frozenset[str]  # source URIs dropped as duplicates
    config: RegionsSection
    storage: Storage


def propose_table(images: pa.Table, proposer: Proposer, skip_sources: frozenset[str] = frozenset()) -> tuple[pa.Table, pa.Table]:
    """(regions, region_status) for an images table with uid, source_uri, width, height, thumb and,
    when the proposer needs it, image."""
    regions, status = [], []
    n = images.num_rows
    columns = [images[c].to_pylist() if c in images.column_names else [None] * n
               for c in ("uid", "source_uri", "width", "height", "image", "thumb")]
    for uid, src, w, h, data, thumb in zip(*columns):
        if src in skip_sources:
            continue
        p = propose_safely(proposer, data, w, h, thumb)
        for i, (box, score) in enumerate(zip(p.boxes.tolist(), p.scores.tolist())):
            regions.append({"uid": uid, "region_id": i, "box": box, "score": score, "method": proposer.method})
        status.append({
            "uid": uid, "method": proposer.method, "boxes": len(p.boxes),
            "reason": p.reason.value if p.reason and not len(p.boxes) else None, "detail": p.detail or None,
            "decode_ms": p.timings.get("decode", 0.0), "segment_ms": p.timings.get("segment", 0.0),
            "score_ms": p.timings.get("score", 0.0),
        })
    return rows_to_table(regions, REGIONS), rows_to_table(status, REGION_STATUS)


def _read_images(payload: RegionsPayload, needs_image: bool) -> pa.Table:
    """The partition's rows, with the full stored images only when the proposer needs them."""
    columns = ["uid", "source_uri", "width", "height", "thumb"] + (["image"] if needs_image else [])
    return read_table(payload.storage, payload.images_uri, columns=columns)


class RegionsStage(Stage):
    """Boxes for every kept image of each ingest partition. SAM runs in long-lived (GPU) actors, the
    model loaded once per actor; the CPU proposers as plain tasks, built per partition."""

    name = STAGE
    needs = ("ingest", "dedupe")
    outputs = {"part": REGIONS, "status": REGION_STATUS}
    marker = "boxes"

    def enabled(self) -> bool:
        return self.config.regions.method != "none"

    def check(self) -> None:
        preflight(self.config.regions)  # ProposerUnavailable: the preflight reports it as a PreflightError

    def check_cluster(self) -> None:
        preflight(self.config.regions, ray_started=True)

    def resources(self) -> Tasks | Actors:
        cfg = self.config.regions
        if not (cfg.method == "salient" and cfg.masks == "sam"):
            return Tasks()
        from pipeline.regions import sam

        placement = sam.actor_placement(cfg.sam)
        return Actors(placement.count, placement.resources)

    def partitions(self, inputs: dict[str, StageResult]) -> list[Partition]:
        cfg, out = self.config.regions, []
        for i, ingest_fp in enumerate(inputs["ingest"].fingerprints):
            skip = partition_skips(self.ctx, i)
            payload = RegionsPayload(join(self.ctx.stage_dir("ingest"), part_name(i)), skip, cfg, self.storage)
            out.append(Partition([cfg.model_dump(mode="json"), ingest_fp, sorted(skip)], payload))
        return out

    def setup(self) -> None:
        self.proposer = make_proposer(self.config.regions)

    def process(self, payload: RegionsPayload) -> dict[str, pa.Table]:
        images = _read_images(payload, self.proposer.needs_image(self.config.ingest.thumb_side))
        regions, status = propose_table(images, self.proposer, payload.skip_sources)
        return {"status": status, "part": regions}


def read_boxes(storage: Storage, regions_uri: str | None) -> dict[str, list[list[int]]]:
    """uid -> boxes in region_id order, from one partition's regions table (None: no boxes)."""
    if regions_uri is None:
        return {}
    return boxes_by_uid(read_table(storage, regions_uri, columns=["uid", "region_id", "box"]))


def boxes_by_uid(regions: pa.Table) -> dict[str, list[list[int]]]:
    """uid -> boxes in region_id order, from a regions table."""
    out: dict[str, list[tuple[int, list[int]]]] = defaultdict(list)
    for uid, rid, box in zip(regions["uid"].to_pylist(), regions["region_id"].to_pylist(), regions["box"].to_pylist()):
        out[uid].append((rid, box))
    return {uid: [b for _, b in sorted(items)] for uid, items in out.items()}
