"""Reading tars back.

`iter_tar(source, uri)`: the one tar member reader of the package, (member name, bytes) of each file
member, every member checked (`check_member`: directories skipped, links, devices and unsafe names
refused). The training loader (pipeline/shards/loader.py), the HTML report and `localcap inspect`
read tars through it.

`iter_paired(dataset)`: a local paired dataset read the way PS3's trainer does, with webdataset,
image and text_box tars iterated in lockstep (the conformance check of what the shard stage wrote).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator

import webdataset as wds

from pipeline.shards.layout import IMAGE_EXTS, SIZES
from pipeline.shards.metadata import check_member, parse_sizes
from pipeline.storage import Storage, join
from schemas.sample import TextBoxSample, validate_sample_json

IMAGE_KEYS = IMAGE_EXTS
READ_SIZE = 4 << 20  # a streamed tar's read size: tarfile's default 10 KB reads cost a Python round trip each on an HTTP body


def iter_tar(source, uri: str = "tar", *, seekable: bool = False, bufsize: int = READ_SIZE,
             select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of each regular file member of a tar, in order.

    `source` is a local path (opened with mode "r:", members read one by one) or a file object:
    read as a non-seekable stream (mode "r|", `bufsize` bytes a read) unless `seekable`.
    Directories are skipped; links, devices and absolute or '..' names raise BadMetadata naming
    `uri`. With `select`, only members whose name it accepts are read (the others are skipped
    without reading their data)."""
    if isinstance(source, (str, os.PathLike)):
        how = {"name": source, "mode": "r:"}
    else:
        how = {"fileobj": source, "mode": "r:" if seekable else "r|", "bufsize": bufsize}
    with tarfile.open(**how) as tar:
        for member in tar:
            if not check_member(member, uri) or (select is not None and not select(member.name)):
                continue
            yield member.name, tar.extractfile(member).read()


class PairingError(RuntimeError):
    """The image and text_box streams disagree: PS3's loader would stop here."""


def shard_urls(dataset: str, folder: str, storage: Storage | None = None) -> list[str]:
    storage = storage or Storage()
    uri = join(dataset, folder, SIZES)
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
