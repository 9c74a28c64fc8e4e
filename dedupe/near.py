"""Near-duplicate pairs among 64-bit perceptual hashes, without comparing all pairs.

Multi-index hashing by the generalised pigeonhole principle: cut each hash into m bands of 64/m bits.
Two hashes within Hamming distance r differ in at most r bands, so they agree exactly on at least
m - r of them. For every choice of m - r bands, hashes are keyed by those bands' bits and sorted;
hashes with equal keys are candidates, and each candidate pair is verified on the full distance.
With r = 4 and m = 8, keys are 32 bits wide (70 band choices): random hashes almost never share
one, so the work is ~70 sorts of N keys, and recall is exact (every pair within r is found). Each
sort is a plain sort of the key packed with the item's index (not an argsort): several times faster.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np


def band_layout(radius: int, bands: int | None = None) -> tuple[int, int]:
    """(number of bands m, bands that must agree m - r) for a Hamming radius. By default m = 8
    (16 from radius 8 on); `bands` = radius + 2 gives fewer band choices with shorter keys, for the
    extra hashes searched at small radii (dedupe/clusters.py)."""
    if radius < 0 or radius >= 16:
        raise ValueError(f"Hamming radius must be in 0..15, got {radius}")
    m = bands if bands is not None else (8 if radius < 8 else 16)
    if not radius < m <= 64:
        raise ValueError(f"{m} bands cannot give a Hamming radius of {radius}")
    return m, m - radius


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b))


def _band_edges(m: int) -> list[int]:
    """Bit offsets of the m bands (the first 64 % m bands one bit wider)."""
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    return [sum(widths[:i]) for i in range(m + 1)]


def _sorted_keys(keys: np.ndarray, key_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, sorted keys). When key and index fit in 64 bits together, one plain sort of the
    packed values (key above, index below) does it, several times faster than an argsort."""
    n = len(keys)
    index_bits = max(1, int(n - 1).bit_length())
    if key_bits + index_bits <= 64:
        packed = np.sort((keys << np.uint64(index_bits)) | np.arange(n, dtype=np.uint64))
        return (packed & np.uint64((1 << index_bits) - 1)).astype(np.int64), packed >> np.uint64(index_bits)
    order = np.argsort(keys)
    return order, keys[order]


def _equal_key_pairs(keys: np.ndarray, max_group: int, key_bits: int = 64, drop_over: int | None = None) -> np.ndarray:
    """(i, j) index pairs, i < j, of equal keys. Groups larger than max_group are returned whole
    as pairs too (they are verified like any other), in chunks by the caller's memory; with
    `drop_over`, groups larger than that are left out (a key that common identifies nothing)."""
    order, sorted_keys = _sorted_keys(keys, key_bits)
    same = sorted_keys[1:] == sorted_keys[:-1]
    if not same.any():
        return np.empty((0, 2), np.int64)
    # Runs of equal keys: start index and length of each run longer than 1.
    edges = np.flatnonzero(np.diff(np.concatenate(([False], same, [False])).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2] + 1
    if drop_over is not None:
        keep = (ends - starts) <= drop_over
        starts, ends = starts[keep], ends[keep]
        if not len(starts):
            return np.empty((0, 2), np.int64)
    out = []
    small = (ends - starts) == 2
    if small.any():  # the common case: pairs
        s = starts[small]
        out.append(np.stack([order[s], order[s + 1]], axis=1))
    for s, e in zip(starts[~small], ends[~small]):
        members = order[s:e]
        i, j = np.triu_indices(len(members), k=1)
        out.append(np.stack([members[i], members[j]], axis=1))
    pairs = np.concatenate(out)
    pairs.sort(axis=1)
    return pairs


def band_choices(radius: int, bands: int | None = None) -> list[tuple[int, ...]]:
    """Every set of bands that must agree: the units of work (and the shuffle key when distributed)."""
    m, agree = band_layout(radius, bands)
    return list(combinations(range(m), agree))


def near_pairs(hashes: np.ndarray, radius: int = 4, max_group: int = 4096, choices: list[tuple[int, ...]] | None = None,
               bands: int | None = None, drop_over: int | None = None) -> np.ndarray:
    """All index pairs (i < j) whose hashes are within `radius` bits, sorted, as an int64 k x 2 array.
    With `choices` (a subset of band_choices), only the pairs those band sets find: the union over a
    partition of band_choices is the full answer, which is how the work is spread over Ray tasks.
    `bands`: see band_layout; `drop_over`: band keys shared by more hashes than that give no pairs
    (for the keypoint windows, where a very common window is no evidence; exact recall otherwise)."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    if len(hashes) < 2:
        return np.empty((0, 2), np.int64)
    m, _ = band_layout(radius, bands)
    edges = _band_edges(m)
    found = []
    for choice in choices if choices is not None else band_choices(radius, bands):
        key = np.zeros(len(hashes), np.uint64)
        shift = 0
        for band in choice:  # the chosen bands' bits, side by side (computed per choice: no N x m array)
            width = edges[band + 1] - edges[band]
            key |= ((hashes >> np.uint64(edges[band])) & np.uint64((1 << width) - 1)) << np.uint64(shift)
            shift += width
        pairs = _equal_key_pairs(key, max_group, shift, drop_over)
        if len(pairs):
            close = hamming(hashes[pairs[:, 0]], hashes[pairs[:, 1]]) <= radius
            found.append(pairs[close])
    if not found:
        return np.empty((0, 2), np.int64)
    return np.unique(np.concatenate(found), axis=0)


def near_pairs_brute(hashes: np.ndarray, radius: int = 4, chunk: int = 2048) -> np.ndarray:
    """The same answer by comparing all pairs (O(N²)); for tests and the benchmark's baseline."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    out = []
    for start in range(0, len(hashes), chunk):
        block = hashes[start:start + chunk]
        dist = hamming(block[:, None], hashes[None, :])
        i, j = np.nonzero(dist <= radius)
        i = i + start
        keep = i < j
        out.append(np.stack([i[keep], j[keep]], axis=1))
    if not out:
        return np.empty((0, 2), np.int64)
    pairs = np.concatenate(out).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
