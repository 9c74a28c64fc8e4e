"""The ingest stage: one partition of input files in, images and rejects tables out."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pyarrow as pa

from dedupe import hashing
from pipeline.ingest import decode
from pipeline.ingest.decode import Rejection, decode_validate
from pipeline.partitions import code_version, fingerprint
from pipeline.storage import FileEntry, Storage
from schemas.config import IngestSection
from schemas.tables import IMAGES, REJECTS, RejectReason, rows_to_table

STAGE = "ingest"


@dataclass(frozen=True)
class IngestPayload:
    entries: list[FileEntry]
    limits: IngestSection
    storage: Storage


def reject_row(uri: str, stage: str, rejection: Rejection) -> dict:
    return {"source_uri": uri, "uid": rejection.uid, "stage": stage, "reason": rejection.reason.value, "detail": rejection.detail}


def ingest_entries(entries: list[FileEntry], limits: IngestSection, storage: Storage) -> tuple[pa.Table, pa.Table]:
    """(images, rejects) for a list of files: every entry lands in exactly one of the two."""
    images, rejects = [], []
    for entry in entries:
        if entry.size > limits.max_bytes:
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
    images, rejects = ingest_entries(payload.entries, payload.limits, payload.storage)
    return {"rejects": rejects, "part": images}


CODE_VERSION = code_version(decode, hashing, sys.modules[__name__])


def partition_fingerprint(entries: list[FileEntry], limits: IngestSection) -> str:
    return fingerprint(STAGE, CODE_VERSION, limits, [(e.uri, e.size, e.version) for e in entries])
