"""The hash index a build deduplicates against: the hashes of every image the dataset's newest
published version holds (its hashes.parquet) and of those its owner blocked (NAME/_blocked/), so
that later builds skip what a version already holds or what was taken down. It is derived from the
published versions (pipeline/versions.py `index_files`): a build that is never published, fails or
is killed leaves it as it was."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedupe.clusters import INDEX
from pipeline.partitions import read_table

HASH_COLUMNS = [name for name in INDEX.names if name != "run_id"]  # what the index keeps of an images table


def read_index(storage, uris: list[str] | tuple[str, ...]) -> pa.Table | None:
    """The index files as one INDEX table; files written before a column existed get it as nulls
    (those images are then matched on the hashes they have)."""
    return pa.concat_tables([with_index_columns(read_table(storage, uri)) for uri in uris]) if uris else None


def with_index_columns(table: pa.Table) -> pa.Table:
    """`table` with every INDEX column (the missing ones as nulls), cast to INDEX's types."""
    columns = {f.name: (table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)) for f in INDEX}
    return pa.table(columns, schema=INDEX)


def kept_hashes(images: pa.Table, kept_uids: list[str], run_id: str) -> pa.Table:
    """The INDEX rows of the kept images (HASH_COLUMNS of `images`), one per uid: what a build
    writes as its hashes.parquet, and publishing adds to the snapshot's."""
    kept = images.filter(pc.is_in(images["uid"], value_set=pa.array(sorted(set(kept_uids)), pa.string())))
    kept = with_index_columns(kept.select([c for c in HASH_COLUMNS if c in kept.column_names])).select(HASH_COLUMNS)
    rows = kept.select(["uid"]).append_column("_row", pa.array(np.arange(kept.num_rows), pa.int64()))
    first = rows.group_by("uid", use_threads=False).aggregate([("_row", "min")])["_row_min"].to_numpy()
    kept = kept.take(pa.array(np.sort(first)))  # one row per uid (list columns cannot be aggregated)
    table = pa.table({**{c: kept[c] for c in kept.column_names}, "run_id": pa.array([run_id] * kept.num_rows, pa.string())})
    return table.select(INDEX.names).cast(INDEX)
