"""WebDataset shards in PS3's paired layout (image/ + text_box/) or a combined layout.

`pipeline.shards.open_dataset(URI)` streams samples for training (see loader.py); it is imported
lazily so that the shard-writing workers do not pay for torch.
"""


def __getattr__(name: str):
    if name == "open_dataset":
        from pipeline.shards.loader import open_dataset

        return open_dataset
    raise AttributeError(name)
