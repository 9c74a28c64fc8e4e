"""URL lists, read as a stream: parquet, csv/tsv, jsonl and txt, optionally gzipped.

`iter_url_rows(path_or_bytes_stream, ...)` yields UrlRow(url, meta) one at a time, reading the file in
batches (parquet row groups / record batches, csv blocks, lines), so a list of 100M rows is never in
memory at once. Optional columns (caption or alt text, license, page URL, ...) go into `meta`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import pyarrow.parquet as pq

URL_COLUMNS = ("url", "image_url", "URL", "src")
META_COLUMNS = ("caption", "alt", "alt_text", "text", "license", "page_url", "page", "width", "height")


@dataclass(frozen=True)
class UrlRow:
    url: str
    meta: dict = field(default_factory=dict)


def list_format(name: str) -> tuple[str, bool]:
    """(format, gzipped) from a file name: parquet, csv, tsv, jsonl or txt."""
    lower = name.lower()
    gz = lower.endswith(".gz")
    if gz:
        lower = lower[:-3]
    for ext, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".json", "jsonl"), (".txt", "txt")):
        if lower.endswith(ext):
            return fmt, gz
    raise ValueError(f"{name}: a URL list must end in .parquet, .csv, .tsv, .jsonl or .txt (optionally .gz)")


def _pick(columns: list[str], url_column: str | None) -> str:
    if url_column:
        if url_column not in columns:
            raise ValueError(f"URL column {url_column!r} not in {columns}")
        return url_column
    for c in URL_COLUMNS:
        if c in columns:
            return c
    raise ValueError(f"no URL column among {columns}; name it with url_column")


def iter_url_rows(stream: BinaryIO, name: str, url_column: str | None = None, batch_rows: int = 65536) -> Iterator[UrlRow]:
    fmt, gz = list_format(name)
    if gz:
        stream = gzip.GzipFile(fileobj=stream)
    if fmt == "parquet":
        pf = pq.ParquetFile(stream)
        col = _pick(pf.schema_arrow.names, url_column)
        keep = [col] + [c for c in META_COLUMNS if c in pf.schema_arrow.names and c != col]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=keep):
            for row in batch.to_pylist():
                yield _row(row, col)
        return
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
    if fmt in ("csv", "tsv"):
        reader = csv.DictReader(text, delimiter="\t" if fmt == "tsv" else ",")
        col = _pick(list(reader.fieldnames or []), url_column)
        for row in reader:
            yield _row(row, col)
    elif fmt == "jsonl":
        col = None
        for line in text:
            line = line.strip()
            if not line:
                continue
            obj = json.loads(line)
            col = col or _pick(list(obj), url_column)
            yield _row(obj, col)
    else:
        for line in text:
            line = line.strip()
            if line and not line.startswith("#"):
                yield UrlRow(line)


def _row(row: dict, col: str) -> UrlRow:
    url = (row.get(col) or "").strip() if isinstance(row.get(col), str) else str(row.get(col) or "")
    meta = {k: row[k] for k in META_COLUMNS if k in row and k != col and row[k] not in (None, "")}
    return UrlRow(url, meta)
