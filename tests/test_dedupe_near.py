"""Near-duplicate hash search: multi-index hashing finds exactly the pairs brute force finds."""

from __future__ import annotations

import numpy as np
import pytest

from dedupe.near import band_layout, near_pairs, near_pairs_brute


def _hashes(n: int, planted: int, radius: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, np.iinfo(np.int64).max, n, dtype=np.int64).astype(np.uint64)
    h ^= rng.integers(0, 2, n, dtype=np.int64).astype(np.uint64) << np.uint64(63)
    for a, b in rng.choice(n, 2 * planted, replace=False).reshape(planted, 2):
        v = h[a]
        for bit in rng.choice(64, int(rng.integers(0, radius + 3)), replace=False):  # some just beyond the radius
            v ^= np.uint64(1) << np.uint64(int(bit))
        h[b] = v
    return h


@pytest.mark.parametrize("radius", [0, 1, 2, 4, 6, 9])
def test_same_pairs_as_brute_force(radius):
    h = _hashes(3000, 300, radius, seed=radius)
    fast, brute = near_pairs(h, radius), near_pairs_brute(h, radius)
    assert len(brute) > 0 and np.array_equal(fast, brute)


def test_groups_of_identical_hashes_give_every_pair():
    h = np.concatenate([np.full(50, 12345, np.uint64), np.arange(1000, dtype=np.uint64) << np.uint64(20)])
    pairs = near_pairs(h, 4)
    assert np.array_equal(pairs, near_pairs_brute(h, 4))
    assert sum(1 for i, j in pairs if i < 50 and j < 50) == 50 * 49 // 2


def test_layout_and_bounds():
    assert band_layout(4) == (8, 4) and band_layout(9) == (16, 7)
    with pytest.raises(ValueError):
        band_layout(16)
    assert near_pairs(np.array([1], np.uint64)).shape == (0, 2)


def test_spread_over_ray_tasks_gives_the_same_pairs(ray_local):
    from dedupe.distributed import near_pairs_ray

    h = _hashes(5000, 400, 4, seed=11)
    assert np.array_equal(near_pairs_ray(h, 4, tasks=3), near_pairs(h, 4))


@pytest.mark.parametrize("radius,bands", [(2, 4), (3, 5), (4, 6), (1, 3)])
def test_fewer_bands_give_the_same_pairs(radius, bands):
    """The layouts the structure and window searches use (radius + 2 bands of uneven width)."""
    h = _hashes(3000, 300, radius, seed=20 + radius)
    assert np.array_equal(near_pairs(h, radius, bands=bands), near_pairs_brute(h, radius))


def test_too_common_keys_can_be_left_out():
    h = np.concatenate([np.full(100, 777, np.uint64), np.array([5, 5], np.uint64)])
    assert len(near_pairs(h, 2, bands=4)) == 100 * 99 // 2 + 1
    assert near_pairs(h, 2, bands=4, drop_over=10).tolist() == [[100, 101]]
