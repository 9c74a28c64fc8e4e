"""List the inputs of a run and cut them into partitions (img2dataset's "reader" role).

File sources are listed (cheap, and each file's size and version go into the fingerprints). Web
sources (URL lists, crawls) are *discovered* once per run into `WORK/RUN/urls/part-NNNNN.parquet`
(the urls table), read as a stream and written as partitions fill, so no list is ever held in memory
whole; `urls/_done.json` records what was discovered, so a resumed run reuses it instead of
re-reading the lists or re-crawling the site.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa

from pipeline.ingest.crawl import crawl_rows, url_row
from pipeline.ingest.url_lists import iter_url_rows, list_format
from pipeline.partitions import fingerprint, part_name, write_table
from pipeline.storage import FileEntry, Storage, join
from schemas.config import CrawlSource, FetchSection, FilesSource, UrlListSource
from schemas.tables import URLS, RejectReason

log = logging.getLogger("localcap")

DONE = "_done.json"


def list_inputs(sources: list, storage: Storage) -> list[FileEntry]:
    """Every file of every `files` source, sorted by URI; a file named by two sources is listed once."""
    seen: dict[str, FileEntry] = {}
    for source in sources:
        if isinstance(source, FilesSource):
            for entry in storage.list_files(source.uri, source.extensions):
                seen.setdefault(entry.uri, entry)
    return sorted(seen.values(), key=lambda e: e.uri)


def chunk(entries: list, size: int) -> list[list]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]


class UrlPartitionWriter:
    """Cuts a stream of urls-table rows into partitions of `size`, writing each as it fills."""

    def __init__(self, storage: Storage, folder: str, size: int):
        self.storage, self.folder, self.size = storage, folder, size
        self.rows: list[dict] = []
        self.fingerprints: list[str] = []
        self.total = 0

    def add(self, row: dict) -> None:
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
    files = storage.list_files(source.uri)
    if not files:
        raise FileNotFoundError(f"URL list source {source.uri}: no list file found")
    for f in files:
        list_format(f.uri)  # fails early, naming the file, on an unknown extension
    return files


def _add_list(source: UrlListSource, entry: FileEntry, storage: Storage, writer: UrlPartitionWriter) -> None:
    fmt, _ = list_format(entry.uri)
    with storage.open_read(entry.uri, seekable=fmt == "parquet") as stream:
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
    discovery = fetch.model_dump(include={"partition_size", "user_agent", "allow_private", "honour_opt_out"})
    what = fingerprint([s.model_dump(mode="json") for s in web], discovery,
                       {i: [(f.uri, f.size, f.version) for f in files] for i, files in lists.items()})
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
