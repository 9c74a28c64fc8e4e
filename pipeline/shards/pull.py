"""`localcap pull`: copy a dataset version (or some of its shards) to a local folder.

Parallel downloads with one byte-counting progress bar; a file already there with the right size
and sha256 is skipped; a partial download (`NAME.part`) is continued with a ranged GET; every file
is checked against the sha256 that files.json records before it takes its final name.

The remote metadata is untrusted (pipeline/shards/metadata.py): before any byte is written, every
path in files.json must name a file of the dataset layout and land under DEST, and dataset.json and
the sizes.json files (fetched first, into memory, checked against files.json) must parse; anything
else refuses the whole pull with one line naming the file. Tars are checked member by member (no
links, no devices) once downloaded; files take their final names only when every file is verified,
dataset.json last, so a refused pull leaves no partial dataset (only resumable `.part` files).
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.dataset_format import SIZES, TAR_SUFFIX, WIDS_INDEXES, folders
from pipeline.shards.metadata import (
    MAX_METADATA_BYTES,
    BadMetadata,
    check_tar,
    parse_dataset_json,
    parse_files,
    parse_sizes,
    safe_destination,
)
from pipeline.storage import Storage, is_s3, join, split_s3
from pipeline.versions import DATASET, FILES, file_sha256, resolve, shard_root

SHARD_INDEX = re.compile(rf"_(\d{{6,}}){re.escape(TAR_SUFFIX)}$")


def parse_shards(spec: str | None) -> range | None:
    """"0:10" -> shards 0..9; "3" -> shard 3; None -> all."""
    if not spec:
        return None
    try:
        if ":" in spec:
            start, stop = spec.split(":", 1)
            return range(int(start or 0), int(stop))
        return range(int(spec), int(spec) + 1)
    except ValueError:
        raise ValueError(f"--shards wants START:STOP (e.g. 0:10) or one index, got {spec!r}") from None


def _read_metadata(storage: Storage, uri: str) -> bytes:
    size = storage.size(uri)
    if size > MAX_METADATA_BYTES:
        raise BadMetadata(f"{uri}: {size} bytes, too large for a metadata file")
    return storage.read_bytes(uri)


def _listing(storage: Storage, version_uri: str) -> list[dict]:
    uri = join(version_uri, FILES)
    if storage.exists(uri):
        return parse_files(_read_metadata(storage, uri), uri)
    raise FileNotFoundError(f"{version_uri} has no {FILES}: pull reads published versions (localcap publish)")


@dataclass
class PullResult:
    version_uri: str
    downloaded: int
    skipped: int
    bytes: int


def _metadata(storage: Storage, version_uri: str, entries: list[dict]) -> dict[str, bytes]:
    """dataset.json and every sizes.json, read into memory, matched against files.json and parsed;
    the layout's folders, and the tars each sizes.json names, checked against the listing."""
    listed = {e["path"]: e for e in entries}
    if DATASET not in listed:
        raise BadMetadata(f"{join(version_uri, FILES)}: lists no {DATASET}")
    data = {}
    for path in [DATASET] + sorted(p for p in listed if p.endswith("/" + SIZES)):
        uri, entry = join(version_uri, path), listed[path]
        if entry["size"] > MAX_METADATA_BYTES:
            raise BadMetadata(f"{uri}: {entry['size']} bytes in {FILES}, too large for a metadata file")
        raw = storage.read_bytes(uri)
        if len(raw) != entry["size"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise BadMetadata(f"{uri}: differs from its size and sha256 in {FILES}")
        data[path] = raw
    info = parse_dataset_json(data[DATASET], join(version_uri, DATASET))
    layout_folders = folders(info["layout"])
    for path in listed:
        if "/" in path and path.split("/")[0] not in layout_folders:
            raise BadMetadata(f"{join(version_uri, FILES)}: {path!r} is not in a folder of the {info['layout']} layout "
                              f"({', '.join(layout_folders)})")
    for folder in layout_folders:
        path = f"{folder}/{SIZES}"
        if path not in data:
            raise BadMetadata(f"{join(version_uri, FILES)}: lists no {path} ({info['layout']} layout)")
        for tar in parse_sizes(data[path], join(version_uri, path), folder):
            if f"{folder}/{tar}" not in listed:
                raise BadMetadata(f"{join(version_uri, path)}: names {tar}, which {FILES} does not list")
    return data


def _fetch(storage: Storage, uri: str, dest: Path, entry: dict, bar: tqdm, data: bytes | None = None) -> tuple[int, Path | None]:
    """Download one file next to its place (resuming a .part), verified: (bytes transferred, the
    verified .part to move into place, or None when the file is there already)."""
    if dest.is_file() and dest.stat().st_size == entry["size"] and file_sha256(dest) == entry["sha256"]:
        bar.update(entry["size"])
        return 0, None
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    sent = 0
    if data is not None:  # metadata, already read and checked
        part.write_bytes(data)
        sent = len(data)
        bar.update(sent)
    else:
        have = part.stat().st_size if part.exists() else 0
        if have > entry["size"]:
            part.unlink()
            have = 0
        bar.update(have)
        if have < entry["size"]:
            if is_s3(uri):
                bucket, key = split_s3(uri)
                extra = {"Range": f"bytes={have}-"} if have else {}
                body = storage.s3.get_object(Bucket=bucket, Key=key, **extra)["Body"]
            else:
                body = open(uri, "rb")
                body.seek(have)
            with body, open(part, "ab") as out:
                while chunk := body.read(1 << 20):
                    out.write(chunk)
                    sent += len(chunk)
                    bar.update(len(chunk))
    if file_sha256(part) != entry["sha256"]:
        part.unlink()
        raise OSError(f"{uri}: sha256 of the download differs from {FILES}; removed, run pull again")
    if dest.suffix == TAR_SUFFIX:
        try:
            check_tar(part, uri)
        except BadMetadata:
            part.unlink()
            raise
    return sent, part


def pull(storage: Storage, uri: str, dest: str | Path, shards: range | None = None, workers: int = 8,
         progress: bool = True) -> PullResult:
    version_uri = resolve(storage, uri)
    tars_at = shard_root(storage, version_uri)  # a snapshot's tars lie in NAME/shards/, shared with other versions
    dest = Path(dest)
    entries = _listing(storage, version_uri)
    # Every path of the version, not only the selected shards: a hostile listing refuses the whole pull.
    targets = {e["path"]: safe_destination(dest, e["path"]) for e in entries}
    metadata = _metadata(storage, version_uri, entries)
    if shards is not None:  # positions in the snapshot's shard order (a snapshot's shard numbers need not start at 0)
        numbers = sorted({int(m.group(1)) for e in entries if (m := SHARD_INDEX.search(e["path"]))})
        chosen = {n for i, n in enumerate(numbers) if i in shards}

        def wanted(e: dict) -> bool:
            m = SHARD_INDEX.search(e["path"])
            return m is None or int(m.group(1)) in chosen
        entries = [e for e in entries if wanted(e)]
    if tars_at != version_uri:  # a snapshot's wids indexes point into NAME/shards/: the copy writes its own
        entries = [e for e in entries if e["path"] not in WIDS_INDEXES]
    last = [e for e in entries if e["path"] == DATASET]  # dataset.json last: a folder with it is whole
    entries = [e for e in entries if e["path"] != DATASET]

    def fetch(e: dict) -> tuple[int, Path | None]:
        source = join(tars_at if e["path"].endswith(TAR_SUFFIX) else version_uri, e["path"])
        return _fetch(storage, source, targets[e["path"]], e, bar, metadata.get(e["path"]))

    bar = tqdm(total=sum(e["size"] for e in entries + last), unit="B", unit_scale=True, desc="pull", disable=not progress)
    try:
        with ThreadPoolExecutor(workers) as pool:
            done = list(pool.map(fetch, entries))
        done += [fetch(e) for e in last]
    finally:
        bar.close()
    for e, (_, part) in zip(entries + last, done):  # every file verified: into place, dataset.json last
        if part is not None:
            part.replace(targets[e["path"]])
    if shards is not None:  # the subset's own sizes.json, so that readers of DEST see only what is there
        for path, raw in metadata.items():
            if path.endswith("/" + SIZES):
                folder = path.split("/")[0]
                counts = parse_sizes(raw, join(version_uri, path), folder)
                targets[path].write_text(json.dumps({k: v for k, v in counts.items() if (dest / folder / k).exists()},
                                                    indent=1, sort_keys=True))
    if shards is not None or tars_at != version_uri:
        # A snapshot's wids indexes point into NAME/shards/ (and a subset's would name absent tars):
        # the copy gets its own, relative to DEST.
        from pipeline.shards.wids import write_wids_index

        info = parse_dataset_json(metadata[DATASET], join(version_uri, DATASET))
        write_wids_index(Storage(), str(dest), info["layout"], str(info.get("name") or dest.name))
    return PullResult(version_uri, sum(1 for _, p in done if p is not None), sum(1 for _, p in done if p is None),
                      sum(s for s, _ in done))
