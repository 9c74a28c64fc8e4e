"""The dedupe stage: every kept ingest image in, one dedupe row per image and the rejects of the
duplicates out, in a single partition (duplicates are found across the whole run and against the
published versions' hashes, dedupe/index.py). Later stages spend nothing on the dropped images:
`dropped_sources` and `partition_skips` give them the sources to skip, read once per run."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import ray

from dedupe import clusters, near
from dedupe.index import HASH_COLUMNS, read_index
from pipeline.partitions import part_name, read_table, read_tables
from pipeline.stage import Partition, RunContext, Stage, StageResult
from pipeline.storage import Storage, join
from pipeline.versions import index_files
from schemas.config import DedupeSection
from schemas.tables import DEDUPE, IMAGES, REJECTS

STAGE = "dedupe"
DEDUPE_COLUMNS = ["sha256", "source_uri", *HASH_COLUMNS]  # exact duplicates by SHA-256, the rest by the index's hashes


@dataclass(frozen=True)
class DedupePayload:
    ingest_dir: str
    index_files: tuple[str, ...]  # the published hash index (pipeline/versions.py index_files)
    config: DedupeSection
    storage: Storage


def dedupe_partition(payload: DedupePayload) -> dict[str, pa.Table]:
    cfg = payload.config
    images = read_tables(payload.storage, payload.ingest_dir, "part", IMAGES, columns=DEDUPE_COLUMNS)
    index = read_index(payload.storage, payload.index_files)
    n = images.num_rows + (index.num_rows if index is not None else 0)
    search = near.near_pairs
    if n >= cfg.distributed_min and n > 1:
        from dedupe.distributed import near_pairs_ray

        tasks = max(2, int(ray.cluster_resources().get("CPU", 2)))
        search = lambda hashes, radius, **kw: near_pairs_ray(hashes, radius, tasks, **kw)  # noqa: E731
    table, rejects = clusters.dedupe_images(images, index, cfg.exact, cfg.near, cfg.radius, cfg.fine_threshold, search)
    return {"rejects": rejects, "part": table}


class DedupeStage(Stage):
    name = STAGE
    needs = ("ingest",)
    outputs = {"part": DEDUPE, "rejects": REJECTS}
    marker = "images"

    def enabled(self) -> bool:
        cfg = self.config.dedupe
        return bool(cfg.exact or cfg.near or self._index_files())

    def _index_files(self) -> list[tuple[str, int]]:
        """The published index files of dedupe.index (default: publish.to), listed once per run:
        enabled, partitions and finish all ask."""
        if "index_files" not in self.ctx.memo:
            self.ctx.memo["index_files"] = index_files(self.storage, self.config.dedupe.index or self.config.publish.to)
        return self.ctx.memo["index_files"]

    def partitions(self, inputs: dict[str, StageResult]) -> list[Partition]:
        files = self._index_files()
        payload = DedupePayload(self.ctx.stage_dir("ingest"), tuple(uri for uri, _ in files), self.config.dedupe, self.storage)
        return [Partition([self.config.dedupe.model_dump(mode="json"), inputs["ingest"].fingerprints, files], payload)]

    def process(self, payload: DedupePayload) -> dict[str, pa.Table]:
        return dedupe_partition(payload)

    def finish(self, report, inputs) -> None:
        if self._index_files():
            report.rows["index_files"] = len(self._index_files())


def dropped_sources(ctx: RunContext) -> frozenset[str]:
    """Source URIs the dedupe stage dropped (read once per run)."""
    if "dropped" not in ctx.memo:
        uri = join(ctx.stage_dir(STAGE), part_name(0, "rejects"))
        dropped = read_table(ctx.storage, uri, columns=["source_uri"])["source_uri"].to_pylist() if ctx.storage.exists(uri) else []
        ctx.memo["dropped"] = frozenset(dropped)
    return ctx.memo["dropped"]


def partition_skips(ctx: RunContext, index: int) -> frozenset[str]:
    """The dropped duplicates in ingest partition `index` (part of its later stages' fingerprints)."""
    key = ("skips", index)
    if key not in ctx.memo:
        dropped = dropped_sources(ctx)
        if not dropped:
            ctx.memo[key] = frozenset()
        else:
            uri = join(ctx.stage_dir("ingest"), part_name(index))
            ctx.memo[key] = frozenset(dropped.intersection(read_table(ctx.storage, uri, columns=["source_uri"])["source_uri"].to_pylist()))
    return ctx.memo[key]
