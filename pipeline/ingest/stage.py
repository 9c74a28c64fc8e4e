"""The ingest stage: one partition of inputs (files, or rows of the urls table) in, images and
rejects tables out. Files are cut into partitions of ingest.partition_size in URI order, then come
the partitions of the urls table (URL lists and crawls, discovered once per run). A URL partition
that recorded retryable fetch failures is redone on the next run, fetching just those again."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.executor import cluster_resources
from pipeline.ingest.decode import Rejection, decode_validate
from pipeline.ingest.downloader import fetch_partition
from pipeline.ingest.reader import chunk, discover_urls, list_inputs
from pipeline.partitions import part_name, read_table
from pipeline.stage import Partition, Stage, StageResult
from pipeline.storage import FileEntry, Storage, join
from schemas.config import FetchSection, IngestSection
from schemas.tables import IMAGES, REJECTS, RejectReason, reject, rows_to_table

STAGE = "ingest"


@dataclass(frozen=True)
class IngestPayload:
    entries: list[FileEntry]  # a partition of files ...
    limits: IngestSection
    storage: Storage
    urls_uri: str | None = None  # ... or of the urls table (URL lists, crawls)
    fetch: FetchSection | None = None
    previous: tuple[str, str] | None = None  # (images, rejects) of an attempt whose retryable failures are fetched again


def reject_row(uri: str, stage: str, rejection: Rejection) -> dict:
    return reject(uri, rejection.uid, stage, rejection.reason, rejection.detail)


def ingest_entries(entries: list[FileEntry], limits: IngestSection, storage: Storage) -> tuple[pa.Table, pa.Table]:
    """(images, rejects) for a list of files: every entry lands in exactly one of the two. An
    entry the listing could not read (an unreadable sub-folder or file) is a read_error reject."""
    images, rejects = [], []
    for entry in entries:
        if entry.error:
            outcome = Rejection(RejectReason.READ_ERROR, entry.error)
        elif entry.size > limits.max_bytes:
            outcome = Rejection(RejectReason.TOO_LARGE_FILE, f"{entry.size} bytes > ingest.max_bytes = {limits.max_bytes}")
        else:
            try:
                data = storage.read_bytes(entry.uri)
            except Exception as exc:  # permissions, a vanished file, an S3 error after retries
                outcome = Rejection(RejectReason.READ_ERROR, f"{type(exc).__name__}: {exc}")
            else:
                outcome = decode_validate(data, entry.uri, limits)
        if isinstance(outcome, Rejection):
            rejects.append(reject_row(entry.uri, STAGE, outcome))
        else:
            images.append(outcome)
    return rows_to_table(images, IMAGES), rows_to_table(rejects, REJECTS)


def ingest_partition(payload: IngestPayload) -> dict[str, pa.Table]:
    if payload.urls_uri is None:
        images, rejects = ingest_entries(payload.entries, payload.limits, payload.storage)
    else:
        previous = None
        if payload.previous:
            previous = tuple(read_table(payload.storage, uri) for uri in payload.previous)
        rows = read_table(payload.storage, payload.urls_uri).to_pylist()
        images, rejects = fetch_partition(rows, payload.fetch, payload.limits, previous)
    return {"rejects": rejects, "part": images}


def files_key(entries: list[FileEntry], limits: IngestSection) -> list:
    return ["files", limits.model_dump(mode="json"), [(e.uri, e.size, e.version) + ((e.error,) if e.error else ()) for e in entries]]


def urls_key(urls_fingerprint: str, limits: IngestSection, cfg: FetchSection) -> list:
    """Of the URLs, the limits and how they are fetched (partition_size only shapes the urls table)."""
    return ["urls", limits.model_dump(mode="json"), cfg.model_dump(mode="json", exclude={"partition_size"}), urls_fingerprint]


class IngestStage(Stage):
    name = STAGE
    outputs = {"part": IMAGES, "rejects": REJECTS}
    marker = "images"

    def partitions(self, inputs: dict[str, StageResult]) -> list[Partition]:
        cfg, storage = self.config, self.storage
        limits, fetch = cfg.ingest, cfg.fetch
        entries = list_inputs(cfg.sources, storage)
        parts = [Partition(files_key(part, limits), IngestPayload(part, limits, storage))
                 for part in chunk(entries, limits.partition_size)]
        urls_dir = self.ctx.stage_dir("urls")
        url_fps, n_urls = discover_urls(cfg.sources, fetch, limits.max_bytes, storage, urls_dir, self.ctx.progress)
        # Per-host limits hold for the whole run: each of the workers running at once gets its share.
        workers = max(1, min(len(url_fps), int(cluster_resources().get("CPU", 1)))) if url_fps else 1
        share = fetch.per_worker(workers)
        parts += [Partition(urls_key(urls_fp, limits, fetch), IngestPayload([], limits, storage, join(urls_dir, part_name(k)), share))
                  for k, urls_fp in enumerate(url_fps)]
        self.inputs, self.first_url_partition = len(entries) + n_urls, len(parts) - len(url_fps)
        return parts

    def process(self, payload: IngestPayload) -> dict[str, pa.Table]:
        return ingest_partition(payload)

    def recorded_failures(self, index: int) -> int:
        """Retryable fetch failures (timeouts, 5xx, ...) in a URL partition's rejects."""
        rejects = self.part_uri(index, "rejects")
        if index < self.first_url_partition or not self.storage.exists(rejects):
            return 0
        return int(pc.sum(read_table(self.storage, rejects, columns=["retryable"])["retryable"]).as_py() or 0)

    def redo_payload(self, payload: IngestPayload, index: int) -> IngestPayload:
        return replace(payload, previous=(self.part_uri(index), self.part_uri(index, "rejects")))

    def finish(self, report, inputs) -> None:
        report.rows["inputs"] = self.inputs
