"""Assign samples to shards by count and by bytes, in a fixed order (a pure function)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.dataset_format import TAR_END, member_size

JSON_ALLOWANCE = 4096  # a text_box JSON with a handful of boxes and captions, rounded up


@dataclass(frozen=True)
class SampleRef:
    key: str
    partition: int  # ingest partition holding the bytes
    row: int  # row within that partition
    n_bytes: int
    text_json: bytes = b""  # the sample's text_box JSON, decided by the plan
    boxes: int = 0


def assign_shards(samples: list[SampleRef], max_samples: int, max_bytes: int, combined: bool) -> list[list[SampleRef]]:
    """Cut the ordered samples into shards: a shard closes at max_samples or before passing max_bytes.

    Sizes are those of the largest tar of the shard (the image tar, or the combined tar); a single
    sample larger than max_bytes still gets a shard of its own rather than being dropped.
    """
    shards: list[list[SampleRef]] = []
    current: list[SampleRef] = []
    size = TAR_END
    for s in samples:
        add = member_size(s.n_bytes) + (member_size(JSON_ALLOWANCE) if combined else 0)
        if current and (len(current) >= max_samples or size + add > max_bytes):
            shards.append(current)
            current, size = [], TAR_END
        current.append(s)
        size += add
    if current:
        shards.append(current)
    return shards
