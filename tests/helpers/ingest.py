"""Ingest without Ray: what the ingest stage computes for a files source, for tests that check the
listing and the ingest partitions directly (also run in a child process with real permissions)."""

from __future__ import annotations

from pathlib import Path

from pipeline.ingest.reader import chunk, list_inputs
from pipeline.ingest.stage import ingest_entries
from pipeline.storage import Storage
from schemas.config import FilesSource, IngestSection


def ingest_folder(folder: Path, partition_size: int = 2) -> tuple[int, list[dict], list[dict]]:
    """(inputs, images rows, rejects rows) as the ingest stage computes them for a files source."""
    limits = IngestSection(partition_size=partition_size)
    storage = Storage()
    entries = list_inputs([FilesSource(uri=str(folder))], storage)
    images, rejects = [], []
    for part in chunk(entries, limits.partition_size):
        i, r = ingest_entries(part, limits, storage)
        images += i.select(["source_uri", "meta"]).to_pylist()
        rejects += r.to_pylist()
    return len(entries), images, rejects
