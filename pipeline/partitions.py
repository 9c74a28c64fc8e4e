"""Stage partitions: Parquet files written atomically, stamped with a fingerprint, skipped when done.

`WORK/RUN_ID/STAGE/part-NNNNN.parquet` is a partition's completion marker: it is written last (after
any side files such as `rejects-NNNNN.parquet` or shard tars) and carries, in its schema metadata,
the fingerprint of what produced it (stage config, inputs, code: pipeline/stage.py). A rerun reads
only the footer to decide whether the partition is done.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import Storage, is_s3, join

FINGERPRINT_KEY = b"localcap.fingerprint"


def fingerprint(*parts) -> str:
    """A stable hash of JSON-able parts (pydantic models are dumped first)."""
    h = hashlib.sha256()
    for part in parts:
        if hasattr(part, "model_dump"):
            part = part.model_dump(mode="json")
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def part_name(index: int, prefix: str = "part") -> str:
    return f"{prefix}-{index:05d}.parquet"


def partition_index(name: str) -> int | None:
    """N of a `PREFIX-NNNNN.parquet` name written by part_name, else None (temporary files, ...)."""
    stem, dot, ext = name.rpartition(".")
    prefix, dash, digits = stem.rpartition("-")
    return int(digits) if ext == "parquet" and dash and prefix and len(digits) == 5 and digits.isdigit() else None


def _stamped(table: pa.Table, fingerprint_value: str | None) -> pa.Table:
    if fingerprint_value is None:
        return table
    meta = dict(table.schema.metadata or {})
    meta[FINGERPRINT_KEY] = fingerprint_value.encode()
    return table.replace_schema_metadata(meta)


def _write_parquet(table: pa.Table, where) -> None:
    # Image bytes are already compressed: zstd would cost ~5 ms per 4K JPEG to save nothing.
    compression = {f.name: "none" if pa.types.is_large_binary(f.type) else "zstd" for f in table.schema}
    pq.write_table(table, where, compression=compression, use_dictionary=False, write_statistics=False)


def write_table(storage: Storage, uri: str, table: pa.Table, fingerprint_value: str | None = None) -> None:
    """Written straight to a temporary file that then becomes `uri` whole (no in-memory copies of
    a partition that may hold hundreds of MB of images)."""
    with storage.atomic_path(uri) as tmp:
        _write_parquet(_stamped(table, fingerprint_value), tmp)


def read_fingerprint(storage: Storage, uri: str) -> str | None:
    """The fingerprint stamped on a partition, or None if it is missing or unreadable."""
    try:
        if is_s3(uri):
            if not storage.exists(uri):
                return None
            schema = pq.read_schema(storage.open_read(uri, seekable=True, buffer_size=1 << 16))
        else:
            schema = pq.read_schema(uri)
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None
    value = (schema.metadata or {}).get(FINGERPRINT_KEY)
    return value.decode() if value else None


def read_table(storage: Storage, uri: str, columns: list[str] | None = None) -> pa.Table:
    if is_s3(uri):
        table = pq.read_table(storage.open_read(uri, seekable=True), columns=columns)
    else:
        table = pq.read_table(uri, columns=columns)
    return table.replace_schema_metadata(None)  # the fingerprint stamp is not data


def read_tables(storage: Storage, folder: str, prefix: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Concatenate `folder/PREFIX-*.parquet` in partition order (an empty table when there are none)."""
    names = [n for n in storage.list_prefix(folder) if n.startswith(prefix + "-") and n.endswith(".parquet")]
    tables = [read_table(storage, join(folder, n), columns) for n in names]
    if not tables:
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    return pa.concat_tables(tables)
