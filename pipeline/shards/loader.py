"""Read a dataset for training: streamed straight from s3:// or a local path, never downloaded whole.

`open_dataset(URI)` is an iterable (a torch IterableDataset when torch is installed) of samples
{key, image, boxes, captions, global_caption, type}. Each shard is one streamed GET per tar, read
as a tar stream; a paired shard's image and text_box tars are read in lockstep and their keys
checked at every position, as PS3's loader does.

Splitting: shards are dealt out across (node rank x DataLoader worker), so under any number of nodes
and workers each sample comes exactly once per epoch. With fewer shards than readers every reader
reads every shard and keeps every n-th sample: no reader idles (an idle DDP rank would hang the others).
Shuffling: the shard order is shuffled per epoch (`set_epoch`), then samples pass a shuffle buffer.

Untrusted input (pipeline/shards/metadata.py): dataset.json and sizes.json are parsed and checked
(a negative or non-integer count is an error); a tar member that is a link or a device is refused;
and at the end of each shard the samples streamed are checked against sizes.json: a shard holding
fewer or more samples than declared raises `ShardCountMismatch` (or, with
`on_count_mismatch="warn"`, warns and goes on), so that a truncated shard is never read silently.
"""

from __future__ import annotations

import io
import logging
import os
import random
import warnings
from collections.abc import Iterator

from pipeline.dataset_format import (
    IMAGE_EXTS,
    SIZES,
    folders,
    text_box_tar,
)
from pipeline.shards.metadata import BadMetadata, parse_dataset_json, parse_sizes
from pipeline.shards.reader import PairingError, ReadAhead, start_tar, tar_groups
from pipeline.storage import Storage, join
from pipeline.versions import DATASET, resolve, shard_root
from schemas.sample import validate_sample_json

ON_COUNT_MISMATCH = ("raise", "warn")
log = logging.getLogger("localcap")


class ShardCountMismatch(BadMetadata):
    """A shard's tar holds fewer or more samples than its sizes.json declares (e.g. it was cut short)."""

try:  # torch is optional: without it the dataset is a plain iterable
    from torch.utils.data import IterableDataset as _Base
    from torch.utils.data import get_worker_info
except ImportError:  # pragma: no cover - exercised only without torch
    _Base = object

    def get_worker_info():
        return None


def _sample(key: str, image: bytes, text_json: bytes, decode: bool) -> dict:
    meta = validate_sample_json(text_json)
    if decode:
        from PIL import Image

        image = Image.open(io.BytesIO(image)).convert("RGB")
    return {"key": key, "image": image, "boxes": meta.box, "captions": meta.text, "global_caption": meta.global_text,
            "type": meta.type}


def first_samples(shards: list[str], sizes: dict[str, int], max_samples: int | None) -> dict[str, int]:
    """{shard: samples to read} holding the first `max_samples` samples of `shards` in their order (the
    last one cut short); {} for no limit. The subsets are nested: a larger limit only adds samples."""
    if max_samples is None:
        return {}
    take, left = {}, max_samples
    for shard in shards:
        if left <= 0:
            break
        take[shard] = min(left, sizes[shard])
        left -= take[shard]
    return take


def _node() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else RANK / WORLD_SIZE."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardDataset(_Base):
    def __init__(self, uri: str, shuffle_buffer: int = 0, seed: int = 0, decode: bool = True,
                 storage: Storage | None = None, shards: range | None = None, split: bool = True,
                 on_count_mismatch: str = "raise", max_samples: int | None = None):
        if on_count_mismatch not in ON_COUNT_MISMATCH:
            raise ValueError(f"on_count_mismatch must be one of {ON_COUNT_MISMATCH}, got {on_count_mismatch!r}")
        self.on_count_mismatch = on_count_mismatch
        self.storage = storage or Storage()
        self.root = resolve(self.storage, uri)
        self.tars_at = shard_root(self.storage, self.root)  # a published snapshot's tars are in NAME/shards/
        info = parse_dataset_json(self.storage.read_bytes(join(self.root, DATASET)), join(self.root, DATASET))
        self.layout = info["layout"]
        self.samples = info["counts"]["samples"]
        self.captioned = bool((info.get("captions") or {}).get("total"))  # built with a captioner: captions to train on
        first = folders(self.layout)[0]
        sizes_uri = join(self.root, first, SIZES)
        self.sizes = parse_sizes(self.storage.read_bytes(sizes_uri), sizes_uri, first)  # tar name -> samples
        self.shards = sorted(self.sizes)
        if shards is not None:
            self.shards = [s for i, s in enumerate(self.shards) if i in shards]
        self.take = first_samples(self.shards, self.sizes, max_samples)
        if max_samples is not None:
            self.shards = [s for s in self.shards if s in self.take]
            self.samples = sum(self.take.values())
        self.shuffle_buffer, self.seed, self.decode = shuffle_buffer, seed, decode
        self.split = split  # False: this reader reads everything (e.g. evaluation on one rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        """(this reader's number, readers in all) over node ranks x DataLoader workers."""
        if not self.split:
            return 0, 1
        rank, world = _node()
        worker = get_worker_info()
        wid, nworkers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        return rank * nworkers + wid, world * nworkers

    def my_shards(self) -> list[str]:
        """This reader's share of the (per-epoch shuffled) shard list: all of it when there are fewer
        shards than readers (then samples are dealt out instead)."""
        order = list(self.shards)
        if self.shuffle_buffer:
            random.Random(self.seed + self.epoch).shuffle(order)
        reader, readers = self._reader()
        return order if len(order) < readers else order[reader::readers]

    def _my_samples(self) -> Iterator[dict]:
        """This reader's samples, shard after shard; each next shard's GETs begin as the one before
        it starts being read, so that no shard waits for its request's round trip."""
        reader, readers = self._reader()
        by_sample = len(self.shards) < readers
        position = 0
        shards = self.my_shards()
        ahead = self._start(shards[0]) if shards else None
        try:
            for i, shard in enumerate(shards):
                streams, ahead = ahead, self._start(shards[i + 1]) if i + 1 < len(shards) else None
                for sample in self.iter_shard(shard, streams):
                    if not by_sample or position % readers == reader:
                        yield sample
                    position += 1
        finally:
            for stream in (ahead or {}).values():  # started, never read: stop its thread, free its connection
                stream.close()

    def _tar_uris(self, shard: str) -> dict[str, str]:
        """{folder: uri} of the tars that make a shard."""
        if self.layout == "combined":
            return {"combined": join(self.tars_at, "combined", shard)}
        return {"image": join(self.tars_at, "image", shard), "text_box": join(self.tars_at, *self.text_tar(shard))}

    def _start(self, shard: str) -> dict[str, ReadAhead]:
        return {folder: start_tar(self.storage, uri) for folder, uri in self._tar_uris(shard).items()}

    def text_tar(self, shard: str) -> tuple[str, str]:
        """(folder, tar name) holding the sample JSONs of a shard (named by its first folder's tar)."""
        return ("combined", shard) if self.layout == "combined" else ("text_box", text_box_tar(shard))

    def iter_shard(self, shard: str, streams: dict[str, ReadAhead] | None = None) -> Iterator[dict]:
        """A shard's samples (from its `streams` when already started); at its end, their number
        checked against sizes.json (unless `max_samples` cut this shard short: then only its first samples)."""
        limit, streamed = self.take.get(shard), 0
        for sample in self._iter_shard(shard, streams or self._start(shard)):
            if limit is not None and streamed >= limit:
                return
            streamed += 1
            yield sample
        self._check_count(shard, streamed)

    def _check_count(self, shard: str, streamed: int) -> None:
        declared = self.sizes.get(shard)
        if declared is None or declared == streamed:
            return
        folder = folders(self.layout)[0]
        message = (f"{join(self.tars_at, folder, shard)}: streamed {streamed} samples, {folder}/sizes.json declares {declared} "
                   f"({'truncated' if streamed < declared else 'more than declared'})")
        if self.on_count_mismatch == "raise":
            raise ShardCountMismatch(message)
        log.warning("%s", message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _iter_shard(self, shard: str, streams: dict[str, ReadAhead]) -> Iterator[dict]:
        try:
            yield from self._shard_samples(shard, streams)
        finally:  # however the reading ended: no thread left filling, no connection held
            for stream in streams.values():
                stream.close()

    def _shard_samples(self, shard: str, streams: dict[str, ReadAhead]) -> Iterator[dict]:
        uris = self._tar_uris(shard)
        if self.layout == "combined":
            for key, group in tar_groups(streams["combined"], uris["combined"]):
                yield _sample(key, next(group[e] for e in IMAGE_EXTS if e in group), group["json"], self.decode)
            return
        texts = tar_groups(streams["text_box"], uris["text_box"])
        position = 0
        for position, (key, group) in enumerate(tar_groups(streams["image"], uris["image"]), start=1):
            text_key, text = next(texts, (None, None))
            if text_key != key:
                raise PairingError(f"{shard} position {position - 1}: image key {key} but text_box key {text_key}")
            yield _sample(key, next(group[e] for e in IMAGE_EXTS if e in group), text["json"], self.decode)
        if next(texts, None) is not None:
            raise PairingError(f"{shard}: the text_box tar holds more samples than the image tar ({position})")

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}/{self.epoch}/{_node()[0]}/{getattr(get_worker_info(), 'id', 0)}")
        buffer: list[dict] = []
        for sample in self._my_samples():
            if self.shuffle_buffer <= 1:
                yield sample
                continue
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __len__(self) -> int:
        return self.samples


def open_dataset(uri: str, shuffle_buffer: int = 0, seed: int = 0, decode: bool = True,
                 storage: Storage | None = None, shards: range | None = None, split: bool = True,
                 on_count_mismatch: str = "raise") -> ShardDataset:
    """Samples of a dataset directory, version (NAME/vN), NAME/LATEST or NAME, local or s3://.
    `split=False`: no dealing across ranks and workers, this reader gets every sample.
    `on_count_mismatch`: "raise" (ShardCountMismatch) or "warn" when a shard streams fewer or more
    samples than its sizes.json declares."""
    return ShardDataset(uri, shuffle_buffer, seed, decode, storage, shards, split, on_count_mismatch)
