"""Read shards back the way PS3's trainer does: image and text_box tars iterated in lockstep."""

from __future__ import annotations

from collections.abc import Iterator

import webdataset as wds

from pipeline.shards.metadata import parse_sizes
from pipeline.storage import Storage, join
from schemas.sample import TextBoxSample, validate_sample_json

IMAGE_KEYS = ("jpg", "png", "webp")


class PairingError(RuntimeError):
    """The image and text_box streams disagree: PS3's loader would stop here."""


def shard_urls(dataset: str, folder: str, storage: Storage | None = None) -> list[str]:
    storage = storage or Storage()
    uri = join(dataset, folder, "sizes.json")
    sizes = parse_sizes(storage.read_bytes(uri), uri, folder)  # plain tar names of the folder, counts >= 0
    return [join(dataset, folder, name) for name in sorted(sizes)]


def _pipeline(urls: list[str]) -> wds.WebDataset:
    return wds.WebDataset(urls, shardshuffle=False, empty_check=False)


def iter_paired(dataset: str) -> Iterator[tuple[str, bytes, TextBoxSample]]:
    """(key, image bytes, sample JSON) of a local paired dataset, checking keys match at every position."""
    images = iter(_pipeline(shard_urls(dataset, "image")))
    texts = iter(_pipeline(shard_urls(dataset, "text_box")))
    position = 0
    for img in images:
        txt = next(texts, None)
        if txt is None or img["__key__"] != txt["__key__"]:
            raise PairingError(f"position {position}: image key {img['__key__']} vs text_box key {txt and txt['__key__']}")
        data = next(img[k] for k in IMAGE_KEYS if k in img)
        yield img["__key__"], data, validate_sample_json(txt["json"])
        position += 1
    if next(texts, None) is not None:
        raise PairingError(f"text_box tars hold more samples than image tars ({position})")
