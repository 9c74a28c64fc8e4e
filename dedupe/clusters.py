"""Near-duplicate images within a run and against the dataset's published hash index.

Candidates come from multi-index hashing over 64-bit pHashes (dedupe/near.py); each candidate pair is
confirmed on the fine signatures (16x16 normalised block means), because two high-resolution images
that differ only in a small detail are different samples. Confirmed pairs are joined into clusters
(union-find). A cluster that holds a published image drops all of this run's members
(`duplicate_published`); otherwise the member with the most pixels is kept (ties: smallest uid) and
the others are `duplicate_near` rejects, each naming the image it duplicates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedupe.hashing import fine_distance
from dedupe.near import near_pairs
from schemas.tables import DEDUPE, REJECTS, RejectReason, reject, rows_to_table

STAGE = "dedupe"
INDEX = pa.schema([("uid", pa.string()), ("phash", pa.uint64()), ("fine_sig", pa.binary(256)),
                   ("width", pa.int32()), ("height", pa.int32()), ("run_id", pa.string())])


def signatures(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """k x 256 int8 view of a fixed-size binary column (no Python objects per row)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 256), np.int8)
    data = np.frombuffer(arr.buffers()[1], dtype=np.int8)
    return data[arr.offset * 256:(arr.offset + len(arr)) * 256].reshape(-1, 256)


def confirmed_pairs(phash: np.ndarray, fine: np.ndarray, radius: int, threshold: float, first_new: int,
                    search: Callable[[np.ndarray, int], np.ndarray] = near_pairs) -> np.ndarray:
    """Index pairs within `radius` bits whose fine signatures agree and that involve at least one
    item at or after `first_new` (this run's images; the published ones come first)."""
    pairs = search(phash, radius)
    if len(pairs) == 0:
        return pairs
    pairs = pairs[pairs[:, 1] >= first_new]  # pairs are (i < j): j is the newer side
    return pairs[fine_distance(fine[pairs[:, 0]], fine[pairs[:, 1]]) <= threshold]


def _roots(pairs: np.ndarray) -> dict[int, int]:
    """Union-find over the items that appear in pairs: item -> the smallest item of its cluster."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {i: find(i) for i in list(parent)}


def near_duplicates(images: pa.Table, index: pa.Table | None, radius: int, threshold: float,
                    search: Callable[[np.ndarray, int], np.ndarray] = near_pairs) -> tuple[pa.Table, pa.Table]:
    """(dedupe rows, rejects) for this run's `images` (uid, source_uri, width, height, phash, fine_sig;
    exact duplicates already removed) against the published `index` (INDEX schema, may be None).
    The index stays in Arrow/numpy columns: only the rows that match are turned into Python values."""
    index = index if index is not None and index.num_rows else INDEX.empty_table()
    n_pub = index.num_rows
    phash = np.concatenate([index["phash"].to_numpy(), images["phash"].to_numpy()]).astype(np.uint64)
    fine = np.concatenate([signatures(index["fine_sig"]), signatures(images["fine_sig"])])
    pairs = confirmed_pairs(phash, fine, radius, threshold, n_pub, search)
    roots = _roots(pairs)

    run_uids = images["uid"].to_pylist()
    run_sources = images["source_uri"].to_pylist()
    run_pixels = [w * h for w, h in zip(images["width"].to_pylist(), images["height"].to_pylist())]

    def uid(i: int) -> str:
        return run_uids[i - n_pub] if i >= n_pub else index["uid"][i].as_py()

    clusters: dict[int, list[int]] = {}
    for item, root in roots.items():
        clusters.setdefault(root, []).append(item)
    decided: dict[int, tuple[int, bool]] = {}  # run item -> (anchor item, published?)
    for group in clusters.values():
        run_members = [i for i in group if i >= n_pub]
        published = [i for i in group if i < n_pub]
        anchor = min(published) if published else min(run_members, key=lambda i: (-run_pixels[i - n_pub], run_uids[i - n_pub]))
        for i in run_members:
            decided[i] = (anchor, bool(published))

    dedupe_rows, rejects = [], []
    for k, (u, src) in enumerate(zip(run_uids, run_sources)):
        anchor, published = decided.get(n_pub + k, (n_pub + k, False))
        kept = anchor == n_pub + k
        anchor_uid = uid(anchor)
        dedupe_rows.append({"uid": u, "cluster": anchor_uid, "kept": kept, "duplicate_of": None if kept else anchor_uid})
        if not kept:
            reason = RejectReason.DUPLICATE_PUBLISHED if published else RejectReason.DUPLICATE_NEAR
            where = "already published (dedupe.index)" if published else f"kept: {run_sources[anchor - n_pub]}"
            rejects.append(reject(src, u, STAGE, reason, f"near duplicate of {anchor_uid}, {where}"))
    return rows_to_table(dedupe_rows, DEDUPE), rows_to_table(rejects, REJECTS)


def dedupe_images(images: pa.Table, index: pa.Table | None, exact_on: bool, near_on: bool, radius: int,
                  threshold: float, search: Callable[[np.ndarray, int], np.ndarray] = near_pairs) -> tuple[pa.Table, pa.Table]:
    """(dedupe table, rejects) for a run: exact duplicates first (by SHA-256), then near duplicates of
    what is left, within the run and against the published index. One dedupe row per image."""
    from dedupe import exact

    rows, rejects = [], []
    survivors = images
    if exact_on:
        exact_rows, exact_rejects = exact.exact_duplicates(images)
        dropped = set(exact_rejects["source_uri"].to_pylist())
        rows.append(exact_rows.filter(pc.invert(exact_rows["kept"])))
        rejects.append(exact_rejects)
        survivors = images.filter(pc.invert(pc.is_in(images["source_uri"], value_set=pa.array(sorted(dropped), pa.string()))))
    if near_on or (index is not None and index.num_rows):
        # With near search off, the index still catches exact content matches (radius 0).
        near_rows, near_rejects = near_duplicates(survivors, index, radius if near_on else 0, threshold, search)
        rows.append(near_rows)
        rejects.append(near_rejects)
    else:
        rows.append(rows_to_table([{"uid": u, "cluster": u, "kept": True, "duplicate_of": None}
                                   for u in survivors["uid"].to_pylist()], DEDUPE))
    table = pa.concat_tables(rows).sort_by("uid")
    return table, pa.concat_tables(rejects) if rejects else REJECTS.empty_table()
