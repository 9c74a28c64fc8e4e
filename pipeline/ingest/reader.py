"""List the inputs of a run and cut them into partitions (img2dataset's "reader" role).

File sources are listed (cheap, and each file's size and version go into the fingerprints). Web
sources (URL lists, crawls) are *discovered* once per run into `WORK/RUN/urls/part-NNNNN.parquet`
(the urls table), read as a stream and written as partitions fill, so no list is ever held in memory
whole; `urls/_done.json` records what was discovered, so a resumed run reuses it instead of
re-reading the lists or re-crawling the site.

Nothing is skipped silently: a sub-folder of a source that cannot be listed is an input of its own
(a FileEntry with `error`), which ingest turns into one `read_error` reject naming the folder, so
inputs = samples + rejected still holds. A source whose root cannot be read at all is a SourceError
before any work (`check_source_root` checks just that, cheaply, for a pre-flight).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pyarrow as pa

from pipeline.ingest.crawl import crawl_rows, url_row
from pipeline.ingest.url_lists import iter_url_rows, list_format
from pipeline.partitions import fingerprint, part_name, write_table
from pipeline.storage import FileEntry, Storage, first_wildcard, is_s3, join, split_s3
from schemas.config import CrawlSource, FetchSection, FilesSource, UrlListSource
from schemas.tables import URLS, RejectReason

log = logging.getLogger("localcap")

DONE = "_done.json"


class SourceError(ValueError):
    """A files or URL-list source whose root (its folder, a glob's fixed folder, its file, its
    bucket) is missing or cannot be read; the message is one line naming the source."""


def _one_line(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(f"{type(exc).__name__}: {text}".split())


def check_source_root(source, storage: Storage) -> None:
    """Raise SourceError unless the root of a `files` or `urls` source exists and can be read.

    Cheap, for a pre-flight: it lists nothing. Local: the folder (a glob: its fixed folder, which
    must exist) is opened and its first entry stat'ed, or the single file opened. S3: one
    ListObjectsV2 of at most one key under the prefix (a missing bucket or denied access fails;
    an empty prefix is an empty folder, not an error). Crawl sources are not checked: a start URL
    that fails is a reject of the run, with a warning.
    """
    if not isinstance(source, (FilesSource, UrlListSource)):
        return
    uri = source.uri
    what = "files" if isinstance(source, FilesSource) else "URL list"
    try:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            cut = first_wildcard(key)
            prefix = key[: key.rfind("/", 0, cut) + 1] if cut >= 0 else key
            storage.s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
            return
        cut = first_wildcard(uri)
        root = (os.path.dirname(uri[:cut]) or ".") if cut >= 0 else uri
        if os.path.isfile(root) and cut < 0:
            with open(root, "rb"):
                return
        if not os.path.isdir(root):
            missing = f"{root} (the fixed folder of the glob)" if cut >= 0 else root
            raise SourceError(f"{what} source {uri}: {missing} does not exist")
        with os.scandir(root) as entries:
            first = next(entries, None)
            if first is not None:
                first.stat(follow_symlinks=False)  # a folder that can be read but not searched fails here
    except SourceError:
        raise
    except Exception as exc:  # PermissionError, an S3 ClientError (NoSuchBucket, AccessDenied), ...
        raise SourceError(f"{what} source {uri} cannot be read: {_one_line(exc)}") from None


def _source_files(source, storage: Storage, extensions: list[str] | None = None) -> list[FileEntry]:
    """storage.list_files with unreadable sub-folders and files as error entries; a root that
    cannot be read is a SourceError."""
    try:
        return storage.list_files(source.uri, extensions, unreadable=True)
    except OSError as exc:
        what = "files" if isinstance(source, FilesSource) else "URL list"
        raise SourceError(f"{what} source {source.uri} cannot be read: {_one_line(exc)}") from None


def list_inputs(sources: list, storage: Storage) -> list[FileEntry]:
    """Every file of every `files` source, sorted by URI; a file named by two sources is listed once.
    An unreadable sub-folder (or file) is listed too, as an entry with `error`: ingest rejects it."""
    seen: dict[str, FileEntry] = {}
    for source in sources:
        if isinstance(source, FilesSource):
            for entry in _source_files(source, storage, source.extensions):
                if entry.error:
                    log.warning("ingest: %s: %s", entry.uri, entry.error)
                seen.setdefault(entry.uri, entry)
    return sorted(seen.values(), key=lambda e: e.uri)


def chunk(entries: list, size: int) -> list[list]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]


class UrlPartitionWriter:
    """Cuts a stream of urls-table rows into partitions of `size`, writing each as it fills. A URL
    named again (twice in a list, in two lists, by a list and a crawl) is one input, listed once, like
    a file named by two sources: the rows of the two copies would otherwise share a uid and a source
    and be indistinguishable downstream. The seen set holds 8-byte digests (~60 bytes a URL)."""

    def __init__(self, storage: Storage, folder: str, size: int):
        self.storage, self.folder, self.size = storage, folder, size
        self.rows: list[dict] = []
        self.fingerprints: list[str] = []
        self.total = 0
        self.seen: set[bytes] = set()

    def add(self, row: dict) -> None:
        key = hashlib.blake2b(row["url"].encode(), digest_size=8).digest()
        if key in self.seen:
            return
        self.seen.add(key)
        self.rows.append(row)
        self.total += 1
        if len(self.rows) >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            fp = fingerprint(self.rows)
            uri = join(self.folder, part_name(len(self.fingerprints)))
            write_table(self.storage, uri, pa.Table.from_pylist(self.rows, schema=URLS), fp)
            self.fingerprints.append(fp)
            self.rows = []


def _list_files(source: UrlListSource, storage: Storage) -> list[FileEntry]:
    files = _source_files(source, storage)
    if not files:
        raise FileNotFoundError(f"URL list source {source.uri}: no list file found")
    for f in files:
        if not f.is_dir:
            list_format(f.uri)  # fails early, naming the file, on an unknown extension
    return files


def _add_list(source: UrlListSource, entry: FileEntry, storage: Storage, writer: UrlPartitionWriter) -> None:
    if entry.error:  # an unreadable sub-folder or list file: one reject row, so it is not lost silently
        log.warning("ingest: %s: %s", entry.uri, entry.error)
        writer.add(url_row(entry.uri, {}, RejectReason.READ_ERROR, entry.error))
        return
    fmt, _ = list_format(entry.uri)
    try:
        opened = storage.open_read(entry.uri, seekable=fmt == "parquet")
    except OSError as exc:
        log.warning("ingest: URL list %s cannot be read: %s", entry.uri, _one_line(exc))
        writer.add(url_row(entry.uri, {}, RejectReason.READ_ERROR, f"unreadable URL list: {_one_line(exc)}"))
        return
    with opened as stream:
        for n, row in enumerate(iter_url_rows(stream, entry.uri, source.url_column)):
            if row.url:
                writer.add(url_row(row.url, row.meta))
            else:
                writer.add(url_row(f"{entry.uri}#row={n}", row.meta, RejectReason.BAD_URL, "no URL in this row"))


def discover_urls(sources: list, fetch: FetchSection, max_bytes: int, storage: Storage, folder: str,
                  progress: bool = True) -> tuple[list[str], int]:
    """Write the urls table of every URL-list and crawl source: (one fingerprint per partition, URLs)."""
    web = [s for s in sources if isinstance(s, (UrlListSource, CrawlSource))]
    if not web:
        return [], 0
    lists = {i: _list_files(s, storage) for i, s in enumerate(web) if isinstance(s, UrlListSource)}
    discovery = fetch.model_dump(include={"partition_size", "user_agent", "allow_private", "allow_loopback", "honour_opt_out"})
    what = fingerprint([s.model_dump(mode="json") for s in web], discovery,
                       {i: [(f.uri, f.size, f.version) + ((f.error,) if f.error else ()) for f in files] for i, files in lists.items()})
    done_uri = join(folder, DONE)
    if storage.exists(done_uri):
        done = json.loads(storage.read_bytes(done_uri))
        if done.get("fingerprint") == what:
            log.info("ingest: reusing the %d URLs discovered earlier in this run", done["urls"])
            return done["partitions"], done["urls"]
    for name in storage.list_prefix(folder):
        storage.delete(join(folder, name))
    writer = UrlPartitionWriter(storage, folder, fetch.partition_size)
    for i, source in enumerate(web):
        if isinstance(source, UrlListSource):
            for entry in lists[i]:
                _add_list(source, entry, storage, writer)
        else:
            stats = crawl_rows(source, fetch, max_bytes, writer.add, progress)
            log.info("crawl of %s: %s", ", ".join(source.start_urls), stats)
    writer.flush()
    storage.write_bytes(done_uri, json.dumps({"fingerprint": what, "urls": writer.total, "partitions": writer.fingerprints}).encode())
    return writer.fingerprints, writer.total
