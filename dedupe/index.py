"""The dataset's hash index: one parquet file per run under `dedupe.index`, holding the perceptual
hashes of the images that run published, so that later runs skip what an earlier version holds.
One file per run: a rerun replaces its own contribution instead of doubling it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedupe.clusters import INDEX
from pipeline.partitions import read_table, write_table
from pipeline.storage import Storage, join

HASH_COLUMNS = [name for name in INDEX.names if name != "run_id"]  # what the index keeps of an images table


def index_file_name(run_id: str) -> str:
    return f"hashes-{run_id}.parquet"


def index_files(storage: Storage, folder: str | None, run_id: str) -> list[tuple[str, int]]:
    """(uri, size) of the index files in `folder` written by other runs than `run_id`."""
    if not folder:
        return []
    own = index_file_name(run_id)
    return [(join(folder, n), storage.size(join(folder, n))) for n in sorted(storage.list_prefix(folder))
            if n.startswith("hashes-") and n.endswith(".parquet") and n != own]


def read_index(storage: Storage, uris: list[str] | tuple[str, ...]) -> pa.Table | None:
    """The index files as one INDEX table; files written before a column existed get it as nulls
    (those images are then matched on the hashes they have)."""
    return pa.concat_tables([_with_index_columns(read_table(storage, uri)) for uri in uris]) if uris else None


def _with_index_columns(table: pa.Table) -> pa.Table:
    """`table` with every INDEX column (the missing ones as nulls), cast to INDEX's types."""
    columns = {f.name: (table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)) for f in INDEX}
    return pa.table(columns, schema=INDEX)


def write_run_hashes(storage: Storage, folder: str, run_id: str, images: pa.Table, kept_uids: list[str]) -> int:
    """Write `run_id`'s index file: the hashes (HASH_COLUMNS of `images`) of the kept images, one row
    per uid. Returns the number of rows written."""
    kept = images.filter(pc.is_in(images["uid"], value_set=pa.array(sorted(set(kept_uids)), pa.string())))
    kept = _with_index_columns(kept.select([c for c in HASH_COLUMNS if c in kept.column_names])).select(HASH_COLUMNS)
    rows = kept.select(["uid"]).append_column("_row", pa.array(np.arange(kept.num_rows), pa.int64()))
    first = rows.group_by("uid", use_threads=False).aggregate([("_row", "min")])["_row_min"].to_numpy()
    kept = kept.take(pa.array(np.sort(first)))  # one row per uid (list columns cannot be aggregated)
    table = pa.table({**{c: kept[c] for c in kept.column_names}, "run_id": pa.array([run_id] * kept.num_rows, pa.string())})
    write_table(storage, join(folder, index_file_name(run_id)), table.select(INDEX.names).cast(INDEX))
    return table.num_rows
