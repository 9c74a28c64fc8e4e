"""The regions stage: one ingest partition in, its boxes (regions table) and per-image outcome
(region_status table) out. Duplicates found by the dedupe stage are skipped: no work is spent on
an image that will not be a sample."""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa

from pipeline.partitions import code_version, fingerprint, read_table
from pipeline.regions import boxes, ocr, proposers, salient, tiles
from pipeline.regions.proposers import Proposer, make_proposer, propose_safely
from pipeline.storage import Storage
from schemas.config import RegionsSection
from schemas.tables import REGION_STATUS, REGIONS, rows_to_table

STAGE = "regions"
CODE_VERSION = code_version(boxes, salient, tiles, ocr, proposers, sys.modules[__name__])


@dataclass(frozen=True)
class RegionsPayload:
    images_uri: str  # an ingest partition
    skip_sources: frozenset[str]  # source URIs dropped as duplicates
    config: RegionsSection
    storage: Storage


def partition_fingerprint(cfg: RegionsSection, ingest_fingerprint: str, skip_sources: frozenset[str]) -> str:
    return fingerprint(STAGE, CODE_VERSION, cfg, ingest_fingerprint, sorted(skip_sources))


def propose_table(images: pa.Table, proposer: Proposer, skip_sources: frozenset[str] = frozenset()) -> tuple[pa.Table, pa.Table]:
    """(regions, region_status) for an images table with uid, source_uri, width, height, image."""
    regions, status = [], []
    for uid, src, w, h, data in zip(*(images[c].to_pylist() for c in ("uid", "source_uri", "width", "height", "image"))):
        if src in skip_sources:
            continue
        p = propose_safely(proposer, data, w, h)
        for i, (box, score) in enumerate(zip(p.boxes.tolist(), p.scores.tolist())):
            regions.append({"uid": uid, "region_id": i, "box": box, "score": score, "method": proposer.method})
        status.append({
            "uid": uid, "method": proposer.method, "boxes": len(p.boxes),
            "reason": None if len(p.boxes) else str(getattr(p.reason, "value", p.reason)), "detail": p.detail or None,
            "decode_ms": p.timings.get("decode", 0.0), "segment_ms": p.timings.get("segment", 0.0),
            "score_ms": p.timings.get("score", 0.0),
        })
    return rows_to_table(regions, REGIONS), rows_to_table(status, REGION_STATUS)


def _read_images(payload: RegionsPayload) -> pa.Table:
    return read_table(payload.storage, payload.images_uri, columns=["uid", "source_uri", "width", "height", "image"])


def regions_partition(payload: RegionsPayload) -> dict[str, pa.Table]:
    """Ray-task form: builds its (cheap) proposer per partition."""
    return RegionsWorker(payload.config)(payload)


class RegionsWorker:
    """Actor form: the proposer (e.g. a SAM model) is built once and serves many partitions."""

    def __init__(self, config: RegionsSection):
        self.proposer = make_proposer(config)

    def __call__(self, payload: RegionsPayload) -> dict[str, pa.Table]:
        regions, status = propose_table(_read_images(payload), self.proposer, payload.skip_sources)
        return {"status": status, "part": regions}


def read_boxes(storage: Storage, regions_uri: str | None) -> dict[str, list[list[int]]]:
    """uid -> boxes in region_id order, from one partition's regions table (None: no boxes)."""
    if regions_uri is None:
        return {}
    t = read_table(storage, regions_uri, columns=["uid", "region_id", "box"])
    out: dict[str, list[tuple[int, list[int]]]] = defaultdict(list)
    for uid, rid, box in zip(t["uid"].to_pylist(), t["region_id"].to_pylist(), t["box"].to_pylist()):
        out[uid].append((rid, box))
    return {uid: [b for _, b in sorted(items)] for uid, items in out.items()}
