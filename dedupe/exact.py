"""Exact duplicates: images whose original bytes have the same SHA-256.

Within a run the first image by source URI is kept; the others become `duplicate_exact` rejects, so
inputs = accepted + rejected still holds and every sample key (the uid) is unique in the shards.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.tables import DEDUPE, REJECTS, RejectReason, reject, rows_to_table

STAGE = "dedupe"


def exact_duplicates(images: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(dedupe table, rejects table) from the uid, sha256 and source_uri columns of the images table."""
    rows = sorted(zip(images["source_uri"].to_pylist(), images["uid"].to_pylist(), images["sha256"].to_pylist()))
    first_by_sha: dict[str, tuple[str, str]] = {}
    dedupe_rows, rejects = [], []
    for uri, uid, sha in rows:
        kept_uri, kept_uid = first_by_sha.setdefault(sha, (uri, uid))
        kept = kept_uri == uri
        dedupe_rows.append({"uid": uid, "cluster": kept_uid, "kept": kept, "duplicate_of": None if kept else kept_uid,
                            "match": None if kept else "exact"})
        if not kept:
            rejects.append(reject(uri, uid, STAGE, RejectReason.DUPLICATE_EXACT, f"same bytes as {kept_uri}"))
    return rows_to_table(dedupe_rows, DEDUPE), rows_to_table(rejects, REJECTS)

