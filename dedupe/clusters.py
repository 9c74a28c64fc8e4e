"""Near-duplicate images within a run and against the dataset's published hash index.

Three kinds of pair, each found by multi-index hashing (dedupe/near.py) and then confirmed:
- edits (re-encodes, resizes, brightness): 64-bit pHashes within `radius` bits, confirmed on the fine
  signatures (16x16 normalised block means), because two high-resolution images that differ only in a
  small detail are different samples;
- theme variants (light/dark, another palette, inverted): structure hashes within STRUCT_RADIUS bits,
  confirmed by the correlation of the structure signatures and the same aspect ratio;
- crops (down to about a third of the area): keypoint-window hashes within CROP_RADIUS bits; the matched
  windows give the scale and offset that place the crop on the larger image, and the fine blocks of the
  overlap must agree. Confirmed pairs are joined into clusters
(union-find). A cluster that holds a published image drops all of this run's members
(`duplicate_published`); otherwise the member with the most pixels is kept (ties: smallest uid) and
the others are `duplicate_near` rejects, each naming the image it duplicates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedupe.hashing import FINE_GRID, FINE_SCALE, fine_distance, structure_correlation
from dedupe.near import near_pairs
from schemas.tables import DEDUPE, REJECTS, RejectReason, reject, rows_to_table

STAGE = "dedupe"
INDEX = pa.schema([("uid", pa.string()), ("phash", pa.uint64()), ("fine_sig", pa.binary(256)),
                   ("width", pa.int32()), ("height", pa.int32()), ("run_id", pa.string()),
                   ("struct_hash", pa.uint64()), ("struct_sig", pa.binary(256)),
                   ("crop_hashes", pa.list_(pa.uint64())), ("crop_points", pa.list_(pa.float32()))])

STRUCT_RADIUS = 4  # structure-hash candidates: within 4 bits (6 bands); 3 missed a day/night pair 4 bits apart
STRUCT_MIN_CORRELATION = 0.6  # theme variants: structure signatures correlate at least this much
MAX_ASPECT_CHANGE = 0.03  # ... and the two images have the same shape (|log aspect ratio| difference)
CROP_RADIUS = 2  # keypoint-window candidates: within 2 bits (4 bands, 6 band choices)
CROP_TRIES = 4  # window matches tried per candidate image pair (closest first)
CROP_COMMON = 64  # a window band key shared by more windows than this is too common to count
CROP_MAX_AREA = 0.9  # a crop covers at most this part of the other image (else it is not a crop)
CROP_MIN_BLOCKS = 16  # the overlap holds at least this many of the larger image's fine blocks
CROP_THRESHOLD_SLACK = 1.5  # crop overlaps are compared on resampled blocks: fine_threshold x this


def signatures(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """k x 256 int8 view of a fixed-size binary column (no Python objects per row); null rows are zeros."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 256), np.int8)
    if arr.null_count:
        arr = pc.fill_null(arr, pa.scalar(bytes(256), pa.binary(256)))
    data = np.frombuffer(arr.buffers()[1], dtype=np.int8)
    return data[arr.offset * 256:(arr.offset + len(arr)) * 256].reshape(-1, 256)


def _flat_lists(column: pa.ChunkedArray | pa.Array, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values, owner row of each value) of a list column, nulls as empty lists, without Python rows."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros(0, dtype), np.zeros(0, np.int64)
    arr = pc.fill_null(arr, pa.scalar([], arr.type)) if arr.null_count else arr
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False).astype(dtype)[offsets[0]:offsets[-1]]
    owners = np.repeat(np.arange(len(arr), dtype=np.int64), np.diff(offsets))
    return values, owners


class HashColumns:
    """The hash columns of the published index followed by this run's images, as numpy arrays."""

    def __init__(self, index: pa.Table, images: pa.Table):
        tables = [index, images]

        def column(name: str) -> list:
            return [t[name] if name in t.column_names else pa.nulls(t.num_rows, INDEX.field(name).type) for t in tables]

        self.n = index.num_rows + images.num_rows
        self.phash = np.concatenate([c.to_numpy() for c in column("phash")]).astype(np.uint64)
        self.fine = np.concatenate([signatures(c) for c in column("fine_sig")])
        struct = [pc.fill_null(c, 0) for c in column("struct_hash")]
        self.has_struct = np.concatenate([c.is_valid().to_numpy(zero_copy_only=False) for c in column("struct_hash")])
        self.struct_hash = np.concatenate([c.to_numpy() for c in struct]).astype(np.uint64)
        self.struct_sig = np.concatenate([signatures(c) for c in column("struct_sig")])
        self.width = np.concatenate([c.to_numpy() for c in column("width")]).astype(np.float64)
        self.height = np.concatenate([c.to_numpy() for c in column("height")]).astype(np.float64)
        hashes, points, owners, offset = [], [], [], 0
        for hash_col, point_col, t in zip(column("crop_hashes"), column("crop_points"), tables):
            h, o = _flat_lists(hash_col, np.uint64)
            p, _ = _flat_lists(point_col, np.float64)
            hashes.append(h)
            points.append(p.reshape(-1, 3) if len(p) == 3 * len(h) else np.zeros((len(h), 3)))
            owners.append(o + offset)
            offset += t.num_rows
        self.crop_hash = np.concatenate(hashes)
        self.crop_point = np.concatenate(points)
        self.crop_owner = np.concatenate(owners)


def _unique_pairs(pairs: np.ndarray) -> np.ndarray:
    return np.unique(pairs, axis=0) if len(pairs) else np.empty((0, 2), np.int64)


def theme_pairs(cols: HashColumns, first_new: int, search: Callable = near_pairs) -> np.ndarray:
    """Pairs of the same shape whose structure hashes are within STRUCT_RADIUS bits and whose structure
    signatures correlate: the same picture in another palette, lightness or polarity."""
    rows = np.flatnonzero(cols.has_struct)
    if len(rows) < 2:
        return np.empty((0, 2), np.int64)
    pairs = rows[search(cols.struct_hash[rows], STRUCT_RADIUS, bands=STRUCT_RADIUS + 2)]
    pairs = pairs[pairs[:, 1] >= first_new]
    if not len(pairs):
        return pairs
    a, b = pairs[:, 0], pairs[:, 1]
    shape = np.abs(np.log(cols.width[a] / cols.height[a]) - np.log(cols.width[b] / cols.height[b])) <= MAX_ASPECT_CHANGE
    pairs = pairs[shape]
    corr = structure_correlation(cols.struct_sig[pairs[:, 0]], cols.struct_sig[pairs[:, 1]])
    return pairs[corr >= STRUCT_MIN_CORRELATION]


def _bilinear(grid: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Bilinear samples of a 16 x 16 grid at block coordinates (0 = the first block's centre)."""
    gx, gy = np.clip(gx, 0, FINE_GRID - 1), np.clip(gy, 0, FINE_GRID - 1)
    x0, y0 = np.minimum(gx.astype(int), FINE_GRID - 2), np.minimum(gy.astype(int), FINE_GRID - 2)
    fx, fy = gx - x0, gy - y0
    return (grid[y0, x0] * (1 - fx) * (1 - fy) + grid[y0, x0 + 1] * fx * (1 - fy)
            + grid[y0 + 1, x0] * (1 - fx) * fy + grid[y0 + 1, x0 + 1] * fx * fy)


def crop_distance(cols: HashColumns, crop: int, big: int, scale: float, dx: float, dy: float) -> float:
    """Largest block difference (standard deviations) between `big`'s fine blocks that lie inside
    `crop` placed on it (big pixel = scale * crop pixel + (dx, dy)) and the same areas of `crop`
    (averaged from its own finer blocks, renormalised on the overlap); inf when `crop` is not inside
    `big`, covers too much of it, or too few blocks overlap."""
    wc, hc, wb, hb = cols.width[crop], cols.height[crop], cols.width[big], cols.height[big]
    left, top, right, bottom = dx, dy, dx + scale * wc, dy + scale * hc
    slack = 0.04 * max(wb, hb)
    if left < -slack or top < -slack or right > wb + slack or bottom > hb + slack:
        return float("inf")
    if (right - left) * (bottom - top) > CROP_MAX_AREA * wb * hb:
        return float("inf")
    bw, bh = wb / FINE_GRID, hb / FINE_GRID
    qx = np.arange(FINE_GRID)
    inside_x = qx[((qx * bw) >= left - 0.1 * bw) & (((qx + 1) * bw) <= right + 0.1 * bw)]
    inside_y = qx[((qx * bh) >= top - 0.1 * bh) & (((qx + 1) * bh) <= bottom + 0.1 * bh)]
    if len(inside_x) * len(inside_y) < CROP_MIN_BLOCKS:
        return float("inf")
    big_grid = cols.fine[big].reshape(FINE_GRID, FINE_GRID).astype(np.float64)
    crop_grid = cols.fine[crop].reshape(FINE_GRID, FINE_GRID).astype(np.float64)
    sub = (np.arange(4) + 0.5) / 4
    px = (inside_x[:, None] + sub[None, :]).ravel() * bw  # sample points in big pixels, 4 x 4 per block
    py = (inside_y[:, None] + sub[None, :]).ravel() * bh
    cx = (px - dx) / scale / (wc / FINE_GRID) - 0.5  # ... in crop block coordinates
    cy = (py - dy) / scale / (hc / FINE_GRID) - 0.5
    samples = _bilinear(crop_grid, cx[None, :], cy[:, None])  # (4 rows per block) x (4 cols per block)
    crop_blocks = samples.reshape(len(inside_y), 4, len(inside_x), 4).mean(axis=(1, 3))
    big_blocks = big_grid[np.ix_(inside_y, inside_x)]

    def z(v: np.ndarray) -> np.ndarray:
        return (v - v.mean()) / max(float(v.std()), FINE_SCALE / 16)

    return float(np.abs(z(crop_blocks) - z(big_blocks)).max())


def crop_pairs(cols: HashColumns, first_new: int, threshold: float, search: Callable = near_pairs) -> np.ndarray:
    """Pairs where one image is a crop of the other: keypoint windows within CROP_RADIUS bits give
    the scale and offset that place the crop on the larger image, and the fine blocks of the overlap
    must agree (crop_distance <= threshold * CROP_THRESHOLD_SLACK)."""
    if len(cols.crop_hash) < 2:
        return np.empty((0, 2), np.int64)
    windows = search(cols.crop_hash, CROP_RADIUS, bands=CROP_RADIUS + 2, drop_over=CROP_COMMON)
    if not len(windows):
        return np.empty((0, 2), np.int64)
    owner_a, owner_b = cols.crop_owner[windows[:, 0]], cols.crop_owner[windows[:, 1]]
    keep = (owner_a != owner_b) & (np.maximum(owner_a, owner_b) >= first_new)
    windows, owner_a, owner_b = windows[keep], owner_a[keep], owner_b[keep]
    dist = np.bitwise_count(cols.crop_hash[windows[:, 0]] ^ cols.crop_hash[windows[:, 1]])
    order = np.lexsort((dist, np.maximum(owner_a, owner_b), np.minimum(owner_a, owner_b)))
    found, tried = [], {}
    for k in order.tolist():
        a, b = int(owner_a[k]), int(owner_b[k])
        key = (min(a, b), max(a, b))
        if tried.get(key, 0) >= CROP_TRIES or (found and found[-1] == key):
            continue
        tried[key] = tried.get(key, 0) + 1
        wa, wb = windows[k]
        if _crop_confirmed(cols, a, b, cols.crop_point[wa], cols.crop_point[wb], threshold * CROP_THRESHOLD_SLACK):
            found.append(key)
    return _unique_pairs(np.array(found, np.int64).reshape(-1, 2))


def _crop_confirmed(cols: HashColumns, a: int, b: int, pa_: np.ndarray, pb: np.ndarray, threshold: float) -> bool:
    """Whether the window match (pa_ in a, pb in b: x, y fractions, sigma fraction of the longer
    side) places one image inside the other with agreeing blocks."""
    xa, ya, sa = pa_[0] * cols.width[a], pa_[1] * cols.height[a], pa_[2] * max(cols.width[a], cols.height[a])
    xb, yb, sb = pb[0] * cols.width[b], pb[1] * cols.height[b], pb[2] * max(cols.width[b], cols.height[b])
    if sa <= 0 or sb <= 0:
        return False
    k = sb / sa  # b pixels per a pixel
    if crop_distance(cols, a, b, k, xb - k * xa, yb - k * ya) <= threshold:
        return True
    return crop_distance(cols, b, a, 1 / k, xa - xb / k, ya - yb / k) <= threshold


def confirmed_pairs(phash: np.ndarray, fine: np.ndarray, radius: int, threshold: float, first_new: int,
                    search: Callable = near_pairs) -> np.ndarray:
    """Index pairs within `radius` bits whose fine signatures agree and that involve at least one
    item at or after `first_new` (this run's images; the published ones come first)."""
    pairs = search(phash, radius)
    if len(pairs) == 0:
        return pairs
    pairs = pairs[pairs[:, 1] >= first_new]  # pairs are (i < j): j is the newer side
    return pairs[fine_distance(fine[pairs[:, 0]], fine[pairs[:, 1]]) <= threshold]


MATCHES = ("edit", "theme", "crop")  # the kinds of near-duplicate pair, in the order they are preferred


def all_pairs(cols: HashColumns, radius: int, threshold: float, first_new: int, search: Callable = near_pairs,
              variants: bool = True) -> dict[str, np.ndarray]:
    """Confirmed pairs of every kind (MATCHES): edits (pHash + fine signature), and with `variants`
    theme variants (structure) and crops (keypoint windows); radius 0 (near search off) keeps only edits."""
    found = {"edit": confirmed_pairs(cols.phash, cols.fine, radius, threshold, first_new, search)}
    if variants and radius > 0:
        found["theme"] = theme_pairs(cols, first_new, search)
        found["crop"] = crop_pairs(cols, first_new, threshold, search)
    return {kind: _unique_pairs(p) for kind, p in found.items() if len(p)}


def pair_kinds(pairs: dict[str, np.ndarray]) -> dict[tuple[int, int], str]:
    """(i, j) -> how they matched, the first kind of MATCHES when several found the pair."""
    out: dict[tuple[int, int], str] = {}
    for kind in reversed(MATCHES):
        for a, b in pairs.get(kind, np.empty((0, 2), np.int64)).tolist():
            out[(a, b)] = kind
    return out


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
    """(dedupe rows, rejects) for this run's `images` (uid, source_uri, width, height and the hash columns;
    exact duplicates already removed) against the published `index` (INDEX schema, may be None).
    The index stays in Arrow/numpy columns: only the rows that match are turned into Python values."""
    index = index if index is not None and index.num_rows else INDEX.empty_table()
    n_pub = index.num_rows
    found = all_pairs(HashColumns(index, images), radius, threshold, n_pub, search)
    kinds = pair_kinds(found)
    roots = _roots(np.array(sorted(kinds), np.int64).reshape(-1, 2))
    linked: dict[int, str] = {}  # item -> how it matched its cluster: the pair with the anchor, else any of its pairs
    for (a, b), kind in sorted(kinds.items()):
        linked.setdefault(a, kind)
        linked.setdefault(b, kind)

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
        match = None if kept else kinds.get(tuple(sorted((anchor, n_pub + k))), linked.get(n_pub + k))
        dedupe_rows.append({"uid": u, "cluster": anchor_uid, "kept": kept, "duplicate_of": None if kept else anchor_uid,
                            "match": match})
        if not kept:
            reason = RejectReason.DUPLICATE_PUBLISHED if published else RejectReason.DUPLICATE_NEAR
            where = "already published (dedupe.index)" if published else f"kept: {run_sources[anchor - n_pub]}"
            rejects.append(reject(src, u, STAGE, reason, f"near duplicate ({match}) of {anchor_uid}, {where}"))
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
        rows.append(rows_to_table([{"uid": u, "cluster": u, "kept": True, "duplicate_of": None, "match": None}
                                   for u in survivors["uid"].to_pylist()], DEDUPE))
    table = pa.concat_tables(rows).sort_by("uid")
    return table, pa.concat_tables(rejects) if rejects else REJECTS.empty_table()
