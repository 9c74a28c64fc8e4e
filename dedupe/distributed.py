"""Near-duplicate search spread over a Ray cluster: the band sets of multi-index hashing are the
shuffle key. Every task sees all hashes (one shared object in Ray's store) and handles some band
sets; the union of their pairs is exactly the in-process answer."""

from __future__ import annotations

import numpy as np
import ray

from dedupe.near import band_choices, near_pairs


@ray.remote(num_cpus=1)
def _pairs_for_bands(hashes: np.ndarray, radius: int, choices: list[tuple[int, ...]], bands: int | None,
                     drop_over: int | None) -> np.ndarray:
    return near_pairs(hashes, radius, choices=choices, bands=bands, drop_over=drop_over)


def near_pairs_ray(hashes: np.ndarray, radius: int, tasks: int, bands: int | None = None, drop_over: int | None = None) -> np.ndarray:
    choices = band_choices(radius, bands)
    ref = ray.put(np.ascontiguousarray(hashes, dtype=np.uint64))
    parts = ray.get([_pairs_for_bands.remote(ref, radius, choices[i::tasks], bands, drop_over) for i in range(min(tasks, len(choices)))])
    parts = [p for p in parts if len(p)]
    return np.unique(np.concatenate(parts), axis=0) if parts else np.empty((0, 2), np.int64)
