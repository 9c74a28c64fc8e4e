"""Reading tars back.

`iter_tar(source, uri)`: the one tar member reader of the package, (member name, bytes) of each file
member, every member checked (`check_member`: directories skipped, links, devices and unsafe names
refused). The training loader (pipeline/shards/loader.py), the HTML report and `localcap inspect`
read tars through it. `read_tar_groups(storage, uri)`: a tar's samples as (key, {extension: bytes}),
streamed with read-ahead (a GET's body overlaps the parsing).

`iter_paired(dataset)`: a local paired dataset read the way PS3's trainer does, with webdataset,
image and text_box tars iterated in lockstep (the conformance check of what the shard stage wrote).
"""

from __future__ import annotations

import io
import os
import queue
import tarfile
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from pipeline.dataset_format import IMAGE_EXTS, SIZES
from pipeline.shards.metadata import BadMetadata, check_member, parse_sizes
from pipeline.storage import Storage, join
from schemas.sample import TextBoxSample, validate_sample_json

IMAGE_KEYS = IMAGE_EXTS
READ_SIZE = 4 << 20  # a streamed tar's read size: tarfile's default 10 KB reads cost a Python round trip each on an HTTP body


BLOCK = tarfile.BLOCKSIZE
EXTENDED_HEADER_MAX = 1 << 20  # a pax or GNU long-name header's data: names and times, never megabytes


def _bad(uri: str, reason: str) -> BadMetadata:
    return BadMetadata(f"{uri}: {reason}")


def _read_exact(stream, n: int) -> bytes:
    """n bytes, or fewer only at the end of the stream (a file object's read may return short)."""
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts, got = [data], len(data)
    while got < n and (more := stream.read(n - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _pax_records(data: bytes, uri: str) -> dict[str, str]:
    """A pax extended header's `LENGTH KEY=VALUE\n` records (POSIX.1-2001)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise _bad(uri, "a malformed pax header") from None
        end = pos + length
        if space < 0 or length <= 0 or end > len(data) or data[end - 1:end] != b"\n":
            raise _bad(uri, "a malformed pax header")
        key, _, value = data[space + 1:end - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _stream_members(stream, uri: str, select: Callable[[str], bool] | None) -> Iterator[tuple[str, bytes]]:
    """The members of a tar read straight off a stream: each header parsed by tarfile.TarInfo.frombuf,
    each member's bytes one read of exactly its size (tarfile's stream mode re-joins its buffer on
    every read, copying each image several times). pax headers and GNU long names apply to the next
    member; sparse members are refused; a stream that ends inside a member raises BadMetadata, one
    that ends where a header would start is the end of the tar (the count check then speaks)."""
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        header = _read_exact(stream, BLOCK)
        if len(header) < BLOCK or header.count(0) == BLOCK:
            if header and header.count(0) != len(header):
                raise _bad(uri, "the tar ends inside a header (cut short)")
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise _bad(uri, f"not a readable tar ({exc})") from None
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if info.size > EXTENDED_HEADER_MAX:
                raise _bad(uri, f"a tar extended header of {info.size} bytes; refused")
            data = _read_exact(stream, -(-info.size // BLOCK) * BLOCK)[:info.size]
            if len(data) < info.size:
                raise _bad(uri, "the tar ends inside an extended header (cut short)")
            if info.type == tarfile.XHDTYPE:
                pax = _pax_records(data, uri)
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue  # a global pax header or a GNU long link name: nothing a member of ours uses
        if "path" in pax or long_name is not None:
            info.name = pax.get("path", long_name)
        if "linkpath" in pax:
            info.linkname = pax["linkpath"]
        if "size" in pax:
            if not pax["size"].isdigit():
                raise _bad(uri, f"tar member {info.name!r} has a pax size {pax['size']!r}")
            info.size = int(pax["size"])
        pax, long_name = {}, None
        if info.type == tarfile.GNUTYPE_SPARSE:
            raise _bad(uri, f"tar member {info.name!r} is a sparse file; refused")
        wanted = check_member(info, uri) and (select is None or select(info.name))
        size = info.size if info.isreg() else 0
        data = _read_exact(stream, size)
        if len(data) < size:
            raise _bad(uri, f"the tar ends inside member {info.name!r} (cut short)")
        if len(_read_exact(stream, -size % BLOCK)) < -size % BLOCK:
            raise _bad(uri, f"the tar ends inside member {info.name!r} (cut short)")
        if wanted:
            yield info.name, data


def iter_tar(source, uri: str = "tar", *, seekable: bool = False, bufsize: int = READ_SIZE,
             select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of each regular file member of a tar, in order.

    `source` is a local path (opened with mode "r:", members read one by one), a seekable file
    object (`seekable`: tarfile, so that `select` skips members without reading them), or a stream,
    parsed here as it is read (`_stream_members`; wrap a raw stream in a buffered reader of `bufsize`).
    Directories are skipped; links, devices and absolute or '..' names raise BadMetadata naming
    `uri`. With `select`, only members whose name it accepts are returned."""
    if not seekable and not isinstance(source, (str, os.PathLike)):
        yield from _stream_members(source, uri, select)
        return
    if isinstance(source, (str, os.PathLike)):
        how = {"name": source, "mode": "r:"}
    else:
        how = {"fileobj": source, "mode": "r:", "bufsize": bufsize}
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
    from pipeline.versions import shard_root

    return [join(shard_root(storage, dataset), folder, name) for name in sorted(sizes)]


def _pipeline(urls: list[str]):
    import webdataset as wds  # imports torch (seconds): only a reader that uses it pays

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


class ReadAhead(io.RawIOBase):
    """Opens and reads a stream in a background thread, up to `depth` chunks ahead, so that the
    network and the tar parsing overlap (the body of a GET otherwise waits while samples are handed
    out), and so that a stream can be started before it is needed (the next shard's GETs while this
    shard is read). `open_stream` is called in that thread; its errors reach the reader."""

    def __init__(self, open_stream: Callable[[], BinaryIO], chunk: int = READ_SIZE, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(depth)
        self._buffer = memoryview(b"")
        self._open, self._stream = open_stream, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(chunk,), daemon=True)
        self._thread.start()

    def _fill(self, chunk: int) -> None:
        try:
            self._stream = self._open()
            while not self._stop.is_set():
                data = self._stream.read(chunk)
                self._queue.put(data)
                if not data:
                    return
        except BaseException as exc:  # handed to the reader
            self._queue.put(exc)

    def readable(self) -> bool:
        return True

    def readinto(self, out) -> int:
        if not self._buffer:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                self._queue.put(b"")  # stay at EOF
                return 0
            self._buffer = memoryview(item)
        n = min(len(out), len(self._buffer))
        out[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a filler waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(0.05)
        if self._stream is not None:
            self._stream.close()
        super().close()


def _tar_members(stream, uri: str = "tar") -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of each file member, in order, from a non-seekable stream; directories
    are skipped, links and devices refused (BadMetadata). Read in READ_SIZE chunks (reader.iter_tar)."""
    for name, data in iter_tar(stream, uri, bufsize=READ_SIZE):
        key, _, ext = name.rsplit("/", 1)[-1].partition(".")
        yield key, ext, data


def _grouped(members: Iterator[tuple[str, str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members with one key -> (key, {ext: bytes})."""
    key, group = None, {}
    for k, ext, data in members:
        if k != key and group:
            yield key, group
            group = {}
        key = k
        group[ext] = data
    if group:
        yield key, group


def start_tar(storage: Storage, uri: str) -> ReadAhead:
    """A tar's stream, its GET (or file open) begun now in the background."""
    return ReadAhead(lambda: storage.open_read(uri))


def tar_groups(stream: ReadAhead, uri: str, buffer_size: int = READ_SIZE) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of a started tar's samples, in order; the stream is closed at the end."""
    with stream:
        yield from _grouped(_tar_members(io.BufferedReader(stream, buffer_size), uri))


def read_tar_groups(storage: Storage, uri: str, buffer_size: int = READ_SIZE) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of a tar's samples, in order: one streamed GET (or file read), read ahead."""
    yield from tar_groups(start_tar(storage, uri), uri, buffer_size)
