"""The ingest stage: one partition of inputs (files, or rows of the urls table) in, images and
rejects tables out."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pyarrow as pa

from dedupe import hashing
from pipeline.ingest import decode, downloader, fetch
from pipeline.ingest.downloader import fetch_partition
from pipeline.ingest.decode import Rejection, decode_validate
from pipeline.partitions import code_version, fingerprint, read_table
from pipeline.storage import FileEntry, Storage
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


FILES_CODE = code_version(decode, hashing, sys.modules[__name__])
URLS_CODE = code_version(decode, hashing, downloader, fetch, sys.modules[__name__])


def partition_fingerprint(entries: list[FileEntry], limits: IngestSection) -> str:
    return fingerprint(STAGE, FILES_CODE, limits, [(e.uri, e.size, e.version) + ((e.error,) if e.error else ()) for e in entries])


def url_partition_fingerprint(urls_fingerprint: str, limits: IngestSection, cfg: FetchSection) -> str:
    """Of the URLs, the limits and how they are fetched (partition_size only shapes the urls table)."""
    return fingerprint(STAGE, URLS_CODE, limits, cfg.model_dump(exclude={"partition_size"}), urls_fingerprint)
