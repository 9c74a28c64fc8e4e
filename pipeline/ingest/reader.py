"""List the inputs of a run and cut them into partitions (img2dataset's "reader" role)."""

from __future__ import annotations

from pipeline.storage import FileEntry, Storage
from schemas.config import FilesSource


def list_inputs(sources: list[FilesSource], storage: Storage) -> list[FileEntry]:
    """Every file of every source, sorted by URI; a file named by two sources is listed once."""
    seen: dict[str, FileEntry] = {}
    for source in sources:
        for entry in storage.list_files(source.uri, source.extensions):
            seen.setdefault(entry.uri, entry)
    return sorted(seen.values(), key=lambda e: e.uri)


def chunk(entries: list[FileEntry], size: int) -> list[list[FileEntry]]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]
