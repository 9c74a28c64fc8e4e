"""A built dataset's files without building one: what the publish, gc and preflight tests need."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def fake_dataset(root: Path, tag: str, tar_sizes: tuple[int, ...] = (1000,)) -> Path:
    """A built dataset's shape (paired tars, sizes.json, manifest, dataset.json) with random bytes
    for tars: one sample per shard, keyed by `tag`."""
    for folder in ("image", "text_box"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, size in enumerate(tar_sizes):
            (root / folder / f"{folder}_{i:06d}.tar").write_bytes(os.urandom(size if folder == "image" else 1024))
        (root / folder / "sizes.json").write_text(json.dumps({f"{folder}_{i:06d}.tar": 1 for i in range(len(tar_sizes))}))
    rows = [{"key": f"{tag}{i}", "uid": f"{tag}{i}", "shard": f"image/image_{i:06d}.tar", "source": f"src/{tag}{i}.jpg",
             "width": 64, "height": 48, "boxes": 1} for i in range(len(tar_sizes))]
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    (root / "dataset.json").write_text(json.dumps({"run_id": tag, "layout": "paired", "created_at": "2026-01-01T00:00:00Z",
                                                   "counts": {"samples": len(tar_sizes), "shards": len(tar_sizes)}}))
    return root
