"""`write_wids_index(dataset_dir)`: the JSON indexes that webdataset's `wids` (indexed, random access)
reads: `wids-image.json` + `wids-text_box.json` for the paired layout (one index per tar stream;
sample i of both is the same key), `wids.json` for the combined one. Apart from the loader, which
imports torch: a build writes these without paying for it."""

from __future__ import annotations

import json

from pipeline.dataset_format import SIZES, folders, wids_index_name
from pipeline.shards.metadata import parse_sizes
from pipeline.storage import Storage, join


def write_wids_index(storage: Storage, dataset_dir: str, layout: str, name: str) -> list[str]:
    """The wids shard indexes of a dataset directory (URLs relative to it); their file names."""
    written = []
    for folder in folders(layout):
        sizes_uri = join(dataset_dir, folder, SIZES)
        sizes = parse_sizes(storage.read_bytes(sizes_uri), sizes_uri, folder)
        index = {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "name": f"{name}/{folder}",
            "shardlist": [{"url": f"{folder}/{tar}", "nsamples": n, "filesize": storage.size(join(dataset_dir, folder, tar))}
                          for tar, n in sorted(sizes.items())],
        }
        file = wids_index_name(layout, folder)
        storage.write_bytes(join(dataset_dir, file), json.dumps(index, indent=1).encode())
        written.append(file)
    return written
