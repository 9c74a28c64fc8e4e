"""`localcap pull`: copy a dataset version (or some of its shards) to a local folder.

Parallel downloads with one byte-counting progress bar; a file already there with the right size
and sha256 is skipped; a partial download (`NAME.part`) is continued with a ranged GET; every file
is checked against the sha256 that files.json records before it takes its final name.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.storage import Storage, is_s3, join, split_s3
from pipeline.versions import DATASET, FILES, file_sha256, resolve

SHARD_INDEX = re.compile(r"_(\d{6})\.tar$")


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


def _listing(storage: Storage, version_uri: str) -> list[dict]:
    if storage.exists(join(version_uri, FILES)):
        return json.loads(storage.read_bytes(join(version_uri, FILES)))["files"]
    raise FileNotFoundError(f"{version_uri} has no {FILES}: pull reads published versions (localcap publish)")


@dataclass
class PullResult:
    version_uri: str
    downloaded: int
    skipped: int
    bytes: int


def _fetch(storage: Storage, uri: str, dest: Path, entry: dict, bar: tqdm) -> int:
    """Download one file into place (resuming a .part), verified; bytes transferred."""
    if dest.is_file() and dest.stat().st_size == entry["size"] and file_sha256(dest) == entry["sha256"]:
        bar.update(entry["size"])
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > entry["size"]:
        part.unlink()
        have = 0
    bar.update(have)
    sent = 0
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
    part.replace(dest)
    return sent


def pull(storage: Storage, uri: str, dest: str | Path, shards: range | None = None, workers: int = 8,
         progress: bool = True) -> PullResult:
    version_uri = resolve(storage, uri)
    dest = Path(dest)
    entries = _listing(storage, version_uri)
    if shards is not None:
        def wanted(e: dict) -> bool:
            m = SHARD_INDEX.search(e["path"])
            return m is None or int(m.group(1)) in shards
        entries = [e for e in entries if wanted(e)]
    last = [e for e in entries if e["path"] == DATASET]  # dataset.json last: a folder with it is whole
    entries = [e for e in entries if e["path"] != DATASET]
    bar = tqdm(total=sum(e["size"] for e in entries + last), unit="B", unit_scale=True, desc="pull", disable=not progress)
    try:
        with ThreadPoolExecutor(workers) as pool:
            sent = list(pool.map(lambda e: _fetch(storage, join(version_uri, e["path"]), dest / e["path"], e, bar), entries))
        sent += [_fetch(storage, join(version_uri, e["path"]), dest / e["path"], e, bar) for e in last]
    finally:
        bar.close()
    if shards is not None:  # the subset's own sizes.json, so that readers of DEST see only what is there
        for sizes in dest.glob("*/sizes.json"):
            counts = json.loads(sizes.read_text())
            sizes.write_text(json.dumps({k: v for k, v in counts.items() if (dest / sizes.parent.name / k).exists()},
                                        indent=1, sort_keys=True))
    return PullResult(version_uri, sum(1 for s in sent if s), sum(1 for s in sent if not s), sum(sent))
