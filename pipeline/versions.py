"""Versions of a dataset: each `NAME/vN` a snapshot of the whole dataset, its shards shared.

The names and folders are those of pipeline/dataset_format.py. A version vN holds every sample of
v(N-1), less what was removed, plus what the build adds; its tars lie in the shard store
NAME/shards/ (immutable, numbered uniquely across the dataset), so publishing uploads only the new
shards and a version folder holds only metadata: the snapshot's manifest, hashes, sizes, wids
indexes, files.json (every file's path in the snapshot, size, sha256, ETag) and dataset.json.

Publishing (`publish_version`, and `remove_samples` for takedowns) is optimistic, as a table log:
1. the new tars get shard numbers from the NAME/_next_shard counter (a compare-and-swap), recorded
   in NAME/_staged/INC.pending.json so that a rerun of the same build reuses them, and are uploaded
   (boto3's transfer manager; ETags checked; a killed run's multipart uploads aborted on rerun);
2. the snapshot = the newest version + the build is composed and its metadata written to
   NAME/_staged/ID/;
3. the number N = newest + 1 is taken by creating NAME/_claims/vN.json if absent (If-None-Match: *).
   That is the commit: a version exists from the claim on and is never a gap. When another
   publisher took N first, the build is composed again on top of that version (samples it already
   holds are left out) and N+1 is tried: no publisher's samples are ever dropped;
4. the staged metadata is copied into NAME/vN/, dataset.json last, and LATEST moved forward.
A publisher killed after step 3 leaves a claimed version whose folder is not whole: the next
publish (or remove, or the rerun) finishes it from its staged metadata before doing anything else.

A build with no sample the newest version lacks publishes nothing (`unchanged`), unless forced.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.dataset_format import (
    BLOCKED,
    CLAIMS,
    DATASET,
    DESCRIPTORS,
    FILES,
    HASHES_FILE,
    LATEST,
    MANIFEST_FILE,
    NEXT_SHARD,
    REJECTS_FILE,
    REPORT_PAGE,
    SHARD_STORE,
    SIZES,
    SNAPSHOT_FORMAT,
    STAGED,
    TAR_SUFFIX,
    brace_list,
    folders,
    renumbered,
    shard_index,
    tar_sample_counts,
    text_box_tar,
    version_name,
    version_number,
    wids_index_name,
)
from pipeline.shards.metadata import BadMetadata, parse_dataset_json, parse_files
from pipeline.storage import Storage, is_s3, join, split_s3, temp_target

log = logging.getLogger("localcap")
HEX64 = re.compile(r"[0-9a-f]{64}")
COMMIT_ATTEMPTS = 20  # other publishers committing first this many times in a row: give up, in one line


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- reading -------------------------------------------------------------------------------------
def resolve(storage: Storage, uri: str) -> str:
    """The dataset directory `uri` names: itself (it holds dataset.json), NAME/LATEST, or NAME (its newest version)."""
    uri = uri.rstrip("/")
    if storage.exists(join(uri, DATASET)):
        return uri
    name, pointer = (uri.rsplit("/", 1)[0], uri) if uri.endswith("/" + LATEST) else (uri, join(uri, LATEST))
    if storage.exists(pointer):
        version = storage.read_bytes(pointer).decode(errors="replace").strip()
        if version_number(version) is not None and storage.exists(join(name, version, DATASET)):
            newest = newest_version(storage, name)  # a publisher killed before moving LATEST: its version is whole
            return join(name, newest or version)
        raise FileNotFoundError(f"{pointer} names {version[:40]!r}, which has no {DATASET}")
    if storage.exists(join(name, CLAIMS)) or storage.list_prefix(join(name, CLAIMS)):
        newest = newest_version(storage, name)
        if newest:
            return join(name, newest)
    raise FileNotFoundError(f"{uri}: neither a dataset (no {DATASET}) nor a dataset name (no {LATEST})")


def shard_root(storage: Storage, root: str) -> str:
    """Where the tars of the dataset directory `root` lie: NAME/shards for a published snapshot
    (its files.json says format 2), else `root` itself (a build's folder, a pulled copy, a version
    published before snapshots)."""
    listing = join(root, FILES)
    if not storage.exists(listing):
        return root
    try:
        fmt = json.loads(storage.read_bytes(listing)).get("format")
    except (ValueError, AttributeError):
        raise BadMetadata(f"{listing}: not JSON") from None
    return join(root.rstrip("/").rsplit("/", 1)[0], SHARD_STORE) if fmt == SNAPSHOT_FORMAT else root


def tar_url(storage: Storage, root: str, path: str) -> str:
    """The URL of one tar of a dataset directory, by its path in the dataset (image/image_000003.tar)."""
    return join(shard_root(storage, root), path)


@dataclass(frozen=True)
class VersionInfo:
    version: str
    uri: str
    samples: int
    shards: int
    created_at: str
    published_at: str | None
    latest: bool
    broken: str | None = None  # why its dataset.json / files.json cannot be read (counts are then 0)
    added: int | None = None
    removed: int | None = None


def _read_version(storage: Storage, uri: str, version: str, latest: bool) -> VersionInfo:
    """One complete version's listing; a dataset.json or files.json that is not the JSON a publish
    writes gives a VersionInfo whose `broken` says why, instead of an exception."""
    what = DATASET
    try:
        info = parse_dataset_json(storage.read_bytes(join(uri, DATASET)), join(uri, DATASET))  # counts and types checked
        c = info["counts"]
        samples, shards, created_at = c["samples"], c["shards"], info["created_at"]
        what = FILES
        files = json.loads(storage.read_bytes(join(uri, FILES))) if storage.exists(join(uri, FILES)) else {}
        published_at = files.get("published_at")
        if not isinstance(published_at, (str, type(None))):
            raise TypeError(f"published_at is {published_at!r}, not a time")
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:200]
        return VersionInfo(version, uri, 0, 0, "", None, latest, broken=f"{what}: {type(exc).__name__}: {detail}")
    added, removed = c.get("added"), c.get("removed")
    return VersionInfo(version, uri, samples, shards, created_at, published_at, latest,
                       added=added if isinstance(added, int) else None, removed=removed if isinstance(removed, int) else None)


def list_versions(storage: Storage, name_uri: str) -> list[VersionInfo]:
    """Published (complete) versions, oldest first; a version without dataset.json is not listed,
    one whose dataset.json (or files.json) cannot be read is listed with `broken` set."""
    name_uri = name_uri.rstrip("/")
    latest = _read_latest(storage, name_uri)
    out = []
    for n in _claimed(storage, name_uri):
        uri = join(name_uri, version_name(n))
        if storage.exists(join(uri, DATASET)):
            out.append(_read_version(storage, uri, version_name(n), version_name(n) == latest))
    return out


def _read_latest(storage: Storage, name_uri: str) -> str | None:
    pointer = join(name_uri, LATEST)
    return storage.read_bytes(pointer).decode(errors="replace").strip() if storage.exists(pointer) else None


def _claimed(storage: Storage, name_uri: str) -> list[int]:
    """Version numbers claimed under a dataset name, ascending."""
    return sorted(n for n in (version_number(c) for c in storage.list_prefix(join(name_uri, CLAIMS))) if n is not None)


def newest_version(storage: Storage, name_uri: str) -> str | None:
    """The newest finished version of a dataset name: the highest claimed vN with a dataset.json
    (LATEST can lag behind it by a killed publisher); None when there is none."""
    for n in reversed(_claimed(storage, name_uri)):
        if storage.exists(join(name_uri, version_name(n), DATASET)):
            return version_name(n)
    return None


# -- files -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalFile:
    path: str  # the file's path in the snapshot, with "/"
    local: Path
    size: int
    sha256: str
    etag: str  # the S3 ETag an upload with our part size gives


def describe_file(root: Path, local: Path, part_size: int, path: str | None = None) -> LocalFile:
    """Size, sha256 and the ETag S3 gives the object when boto3's transfer manager uploads it with
    this part size (md5 of the body below the multipart threshold; md5 of the parts' md5s, "-N",
    above it), from one read of the file."""
    sha, whole, parts = hashlib.sha256(), hashlib.md5(usedforsecurity=False), []
    size = local.stat().st_size
    with open(local, "rb") as f:
        while chunk := f.read(part_size):
            sha.update(chunk)
            whole.update(chunk)
            parts.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    etag = whole.hexdigest() if size < part_size else hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest() + f"-{len(parts)}"
    return LocalFile(path or local.relative_to(root).as_posix(), local, size, sha.hexdigest(), etag)


def expected_etag(path: Path, part_size: int) -> str:
    return describe_file(path.parent, path, part_size).etag


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _upload(storage: Storage, f: LocalFile, uri: str, part_size: int, threads: int) -> None:
    if is_s3(uri):
        from boto3.s3.transfer import TransferConfig

        bucket, key = split_s3(uri)
        config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size, max_concurrency=threads)
        storage.s3.upload_file(str(f.local), bucket, key, Config=config)
        etag = storage.etag(uri)
        if etag != f.etag:
            storage.delete(uri)
            raise OSError(f"{uri}: ETag {etag} after upload, expected {f.etag} (corrupted in transit?)")
    else:
        storage.put_file(f.local, uri)
        if file_sha256(Path(uri)) != f.sha256:
            raise OSError(f"{uri}: sha256 differs after the copy")


def _already_there(storage: Storage, f: LocalFile, uri: str) -> bool:
    if is_s3(uri):
        return storage.etag(uri) == f.etag
    return Path(uri).is_file() and Path(uri).stat().st_size == f.size and file_sha256(Path(uri)) == f.sha256


def abort_stale_uploads(storage: Storage, uris: list[str]) -> int:
    """Abort the incomplete multipart uploads (S3) or remove the temporary files (local) that a
    killed upload of exactly these objects left; the number removed. Other objects' are left alone:
    another publisher may be uploading them."""
    wanted: dict[str, set[str]] = {}
    for uri in uris:
        folder, _, name = uri.rstrip("/").rpartition("/")
        wanted.setdefault(folder, set()).add(name)
    n = 0
    for folder, names in wanted.items():
        if is_s3(folder):
            bucket, _ = split_s3(folder)
            for key, upload_id in storage.list_uploads(folder):
                if key.rsplit("/", 1)[-1] in names:
                    storage.s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
                    n += 1
        elif Path(folder).is_dir():
            for entry in Path(folder).iterdir():
                if temp_target(entry.name) in names:
                    entry.unlink(missing_ok=True)
                    n += 1
    return n


def incomplete_uploads(storage: Storage, folder: str) -> list[str]:
    """Names of the objects in `folder` with an upload that never finished (an S3 multipart upload
    left by a killed publisher, or a local temporary)."""
    if is_s3(folder):
        prefix = split_s3(folder)[1].rstrip("/") + "/"
        return sorted({key[len(prefix):] for key, _ in storage.list_uploads(folder) if "/" not in key[len(prefix):]})
    if not Path(folder).is_dir():
        return []
    return sorted(temp_target(e.name) for e in Path(folder).iterdir() if temp_target(e.name))


def _s3_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


# -- snapshots ---------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """What a version holds: its samples (manifest rows; `shard` names the image/combined tar's
    path in the snapshot), their hashes, every tar with its size, sha256 and ETag, and dataset.json."""

    layout: str
    manifest: pa.Table
    hashes: pa.Table | None
    tars: dict[str, dict] = field(default_factory=dict)  # path -> {"size", "sha256", "etag"}
    info: dict = field(default_factory=dict)
    version: str | None = None

    def uids(self) -> set[str]:
        return set(self.manifest["uid"].to_pylist())


def _read_parquet(storage: Storage, uri: str) -> pa.Table:
    from pipeline.partitions import read_table

    return read_table(storage, uri)


def read_snapshot(storage: Storage, name_uri: str, version: str) -> Snapshot:
    """A finished version as a Snapshot (its metadata read from storage: checked before use)."""
    uri = join(name_uri, version)
    info = parse_dataset_json(storage.read_bytes(join(uri, DATASET)), join(uri, DATASET))
    if not storage.exists(join(uri, FILES)):
        raise BadMetadata(f"{join(uri, FILES)}: missing; the version's shards cannot be listed")
    raw = storage.read_bytes(join(uri, FILES))
    entries = parse_files(raw, join(uri, FILES))
    if json.loads(raw).get("format") != SNAPSHOT_FORMAT:
        raise BadMetadata(f"{join(uri, FILES)}: published by a localcap before snapshots (tars inside the version); "
                          "publish the whole dataset again into a new NAME")
    listed = {e["path"] for e in entries}
    tars = {e["path"]: {"size": e["size"], "sha256": e["sha256"], "etag": e.get("etag", "")}
            for e in entries if e["path"].endswith(TAR_SUFFIX)}
    manifest = _read_parquet(storage, join(uri, MANIFEST_FILE))
    hashes = _read_parquet(storage, join(uri, HASHES_FILE)) if HASHES_FILE in listed else None
    for shard in set(manifest["shard"].to_pylist()):
        if shard not in tars:
            raise BadMetadata(f"{join(uri, MANIFEST_FILE)}: names {shard!r}, which {FILES} does not list")
    return Snapshot(info["layout"], manifest, hashes, tars, info, version)


def index_files(storage: Storage, name_uri: str | None) -> list[tuple[str, int]]:
    """(uri, size) of the hash files a build of `name_uri` deduplicates against: its newest
    version's hashes.parquet and NAME/_blocked/*.parquet. Only a published version (or a removal)
    changes them: a build that is never published leaves them as they were."""
    if not name_uri:
        return []
    name_uri = name_uri.rstrip("/")
    out = []
    newest = newest_version(storage, name_uri)
    if newest and storage.exists(join(name_uri, newest, HASHES_FILE)):
        out.append(join(name_uri, newest, HASHES_FILE))
    out += [join(name_uri, BLOCKED, n) for n in sorted(storage.list_prefix(join(name_uri, BLOCKED))) if n.endswith(".parquet")]
    return [(uri, storage.size(uri)) for uri in out]


def _shard_paths(layout: str, first_path: str) -> list[str]:
    """Every tar path of a shard, by its first folder's tar path."""
    return [first_path] if layout == "combined" else [first_path, text_box_tar(first_path)]


def snapshot_counts(manifest: pa.Table) -> dict[str, int]:
    return {"samples": manifest.num_rows, "shards": len(set(manifest["shard"].to_pylist()))}


def value_summary(values: list[float]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    return {"min": s[0], "median": s[len(s) // 2], "max": s[-1], "mean": round(sum(s) / len(s), 3)}


def value_counts(values: list) -> dict[str, int]:
    """How many of each value (None counted as 'unknown'), keys sorted."""
    out: dict[str, int] = {}
    for v in values:
        key = "unknown" if v is None else str(v)
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def snapshot_statistics(manifest: pa.Table) -> dict:
    """What the manifest says of the whole snapshot: image sizes and boxes per image."""
    widths, heights = manifest["width"].to_pylist(), manifest["height"].to_pylist()
    return {"width": value_summary(widths), "height": value_summary(heights),
            "megapixels": value_summary([round(w * h / 1e6, 3) for w, h in zip(widths, heights)]),
            "boxes_per_image": value_summary(manifest["boxes"].to_pylist()),
            "images_by_box_count": value_counts(manifest["boxes"].to_pylist())}


def shard_url_lists(name_uri: str, layout: str, manifest: pa.Table) -> dict[str, str]:
    """Per folder, the snapshot's tars as the URL list PS3's loader takes (`--train-data-image`,
    `--train-data-text-box`): brace patterns over runs of shard numbers, joined with '::'; the
    folders' lists name the same shards in the same order (PS3 pairs them by position)."""
    firsts = sorted(set(manifest["shard"].to_pylist()), key=shard_index)
    out = {}
    for i, folder in enumerate(folders(layout)):
        out[folder] = brace_list([join(name_uri, SHARD_STORE, _shard_paths(layout, p)[i]) for p in firsts])
    return out


def write_snapshot_metadata(out: Path, snap: Snapshot, wids_prefix: str) -> list[Path]:
    """The snapshot's descriptors into a local folder: FOLDER/sizes.json, manifest, hashes, wids
    indexes (shard URLs `wids_prefix` + path); dataset.json is written by the caller."""
    written = []
    sizes = tar_sample_counts(snap.manifest, snap.layout)
    for folder, counts in sizes.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / SIZES).write_text(json.dumps(counts, indent=1, sort_keys=True))
        written.append(out / folder / SIZES)
        index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": f"{snap.info.get('name', 'dataset')}/{folder}",
                 "shardlist": [{"url": f"{wids_prefix}{folder}/{tar}", "nsamples": n, "filesize": snap.tars[f"{folder}/{tar}"]["size"]}
                               for tar, n in sorted(counts.items())]}
        (out / wids_index_name(snap.layout, folder)).write_text(json.dumps(index, indent=1))
        written.append(out / wids_index_name(snap.layout, folder))
    pq.write_table(snap.manifest, out / MANIFEST_FILE)
    written.append(out / MANIFEST_FILE)
    if snap.hashes is not None:
        pq.write_table(snap.hashes, out / HASHES_FILE)
        written.append(out / HASHES_FILE)
    return written


# -- shard numbers -----------------------------------------------------------------------------------
def allocate_shards(storage: Storage, name_uri: str, increment_id: str, count: int) -> int:
    """The first of `count` shard numbers nobody else has, for the increment `increment_id`: the
    one recorded for it when an earlier attempt of the same build took them (so that a rerun
    uploads to the same names and skips what is there), else taken from NAME/_next_shard with a
    compare-and-swap. A number taken by a publisher that then died is never used: a gap in shard
    numbers is harmless, one in version numbers is not."""
    pending = join(name_uri, STAGED, f"{increment_id}.pending.json")
    if storage.exists(pending):
        try:
            base = json.loads(storage.read_bytes(pending))["shard_base"]
            if isinstance(base, int) and not isinstance(base, bool) and base >= 0:
                return base
        except (ValueError, KeyError, TypeError):
            pass
        raise BadMetadata(f"{pending}: not a shard-number record localcap writes")
    counter = join(name_uri, NEXT_SHARD)
    for _ in range(100):
        raw, tag = storage.read_tagged(counter)
        if raw is None:
            base = 1 + max((shard_index(n) for n in storage.list_prefix(join(name_uri, SHARD_STORE, "image"))
                            + storage.list_prefix(join(name_uri, SHARD_STORE, "combined")) if n.endswith(TAR_SUFFIX)), default=-1)
        else:
            text = raw.decode(errors="replace").strip()
            if not text.isdigit():
                raise BadMetadata(f"{counter}: {text[:40]!r} is not a shard number")
            base = int(text)
        if storage.replace_if(counter, str(base + count).encode(), tag):
            storage.write_bytes(pending, json.dumps({"shard_base": base, "count": count, "at": now()}).encode())
            return base
        time.sleep(0.05)
    raise RuntimeError(f"{counter}: could not take shard numbers in 100 attempts (it kept changing)")


# -- tars ----------------------------------------------------------------------------------------------
def filter_tar(source, dest: Path, keep: Callable[[str], bool], uri: str) -> int:
    """Copy the members of a tar whose sample key `keep` accepts into a new reproducible tar; the
    number of samples kept."""
    from pipeline.shards.reader import iter_tar
    from pipeline.shards.writer import write_tar

    members = [(name, data) for name, data in iter_tar(source, uri) if keep(name.rsplit("/", 1)[-1].partition(".")[0])]
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_tar(str(dest), members)
    return len({name.rsplit("/", 1)[-1].partition(".")[0] for name, _ in members})


@dataclass
class Increment:
    """New shards for a snapshot: local tars (already written) to be stored under new shard numbers,
    the manifest rows they hold (`shard` still the local path), and their hashes."""

    tars: dict[str, list[Path]]  # local first-folder path -> the shard's local tars, in folder order
    manifest: pa.Table
    hashes: pa.Table | None
    layout: str

    def content_id(self, salt: str = "") -> str:
        """Identifies what is added, without times: the rows and every tar's name and size
        (a rerun of the same build gives the same id, and so finds its own uploads and claim)."""
        h = hashlib.sha256(salt.encode())
        rows = self.manifest.select(["key", "uid", "shard", "source", "width", "height", "boxes"]).to_pylist()
        h.update(json.dumps(sorted(rows, key=lambda r: r["key"]), sort_keys=True).encode())
        for first in sorted(self.tars):
            for p in self.tars[first]:
                h.update(f"{p.name}:{p.stat().st_size}".encode())
        return h.hexdigest()


def build_increment(dataset_dir: Path, have: set[str], scratch: Path) -> Increment:
    """The part of a local build a snapshot that holds `have` (uids) lacks: its shards as they are,
    or, for a shard holding samples the snapshot already has (another build published them in
    the meantime), rewritten without them into `scratch`."""
    info = parse_dataset_json((dataset_dir / DATASET).read_bytes(), str(dataset_dir / DATASET))
    layout = info["layout"]
    manifest = pq.read_table(dataset_dir / MANIFEST_FILE)
    hashes = pq.read_table(dataset_dir / HASHES_FILE) if (dataset_dir / HASHES_FILE).exists() else None
    new = manifest.filter(pc.invert(pc.is_in(manifest["uid"], value_set=pa.array(sorted(have), pa.string())))) if have else manifest
    keys = set(new["key"].to_pylist())
    tars: dict[str, list[Path]] = {}
    for first in sorted(set(new["shard"].to_pylist())):
        local = [dataset_dir / p for p in _shard_paths(layout, first)]
        if manifest.filter(pc.equal(manifest["shard"], first)).num_rows != new.filter(pc.equal(new["shard"], first)).num_rows:
            rewritten = [scratch / p for p in _shard_paths(layout, first)]
            for src, dst in zip(local, rewritten):
                filter_tar(src, dst, keys.__contains__, str(src))
            local = rewritten
        tars[first] = local
    if hashes is not None:
        hashes = hashes.filter(pc.is_in(hashes["uid"], value_set=pa.array(sorted(set(new["uid"].to_pylist())), pa.string())))
    return Increment(tars, new, hashes, layout)


def _renamed(manifest: pa.Table, names: dict[str, str]) -> pa.Table:
    shard = pa.array([names[s] for s in manifest["shard"].to_pylist()], pa.string())
    return manifest.set_column(manifest.schema.get_field_index("shard"), manifest.schema.field("shard"), shard)


@dataclass
class PublishResult:
    version: str | None  # the version made (or, when unchanged, the newest one; None: there is none)
    uri: str | None
    uploaded: int
    skipped: int
    bytes_uploaded: int
    resumed: bool
    latest: str | None  # what LATEST names after the publish
    unchanged: bool = False  # nothing new: no version made
    reason: str = ""  # why nothing was published (unchanged)
    added: int = 0
    removed: int = 0
    samples: int = 0  # in the snapshot
    shards: int = 0  # in the snapshot


class _Uploader:
    """Uploads an increment's tars to the shard store under new numbers, in parallel, counting."""

    def __init__(self, storage: Storage, name_uri: str, concurrency: int, part_size: int, progress: bool,
                 after_upload: Callable[[str], None] | None):
        self.storage, self.name_uri, self.concurrency, self.part_size = storage, name_uri, concurrency, part_size
        self.progress, self.after_upload = progress, after_upload
        self.uploaded = self.skipped = self.sent = 0

    def put(self, inc: Increment, base: int) -> tuple[dict[str, str], dict[str, dict]]:
        """(local first path -> its path in the snapshot, snapshot tar path -> size, sha256, etag)."""
        names, jobs = {}, []
        for i, first in enumerate(sorted(inc.tars, key=shard_index)):
            names[first] = renumbered(first, base + i)
            for local, path in zip(inc.tars[first], _shard_paths(inc.layout, names[first])):
                jobs.append((local, path))
        uris = [join(self.name_uri, SHARD_STORE, path) for _, path in jobs]
        stale = abort_stale_uploads(self.storage, uris)  # what a killed attempt of these very uploads left
        if stale:
            log.info("publish: aborted %d incomplete upload(s) an interrupted publish left", stale)
        bar = tqdm(total=sum(p.stat().st_size for p, _ in jobs), unit="B", unit_scale=True, desc="publish shards",
                   disable=not self.progress)
        per_file = max(1, self.concurrency // max(1, min(self.concurrency, len(jobs))))

        def one(job: tuple[Path, str]) -> LocalFile:
            local, path = job
            f = describe_file(local.parent, local, self.part_size, path)
            uri = join(self.name_uri, SHARD_STORE, path)
            if _already_there(self.storage, f, uri):
                self.skipped += 1
            else:
                _upload(self.storage, f, uri, self.part_size, per_file)
                self.uploaded += 1
                self.sent += f.size
                if self.after_upload:
                    self.after_upload(path)
            bar.update(f.size)
            return f

        pool = ThreadPoolExecutor(self.concurrency)
        try:
            files = list(pool.map(one, jobs))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            try:  # boto3 aborts an upload whose own part failed; this takes those cut short by another's failure
                abort_stale_uploads(self.storage, uris)
            except (OSError, *_s3_errors()) as exc:
                log.warning("publish: could not abort the incomplete uploads: %s", exc)
            raise
        finally:
            pool.shutdown(wait=True)
            bar.close()
        return names, {f.path: {"size": f.size, "sha256": f.sha256, "etag": f.etag} for f in files}


def commit(storage: Storage, name_uri: str, snap: Snapshot, staged_id: str, parent: str | None, body: dict) -> int | None:
    """Stage the snapshot's metadata under NAME/_staged/ID/ and take the next version number for it
    (the commit). The number, or None when another publisher took it first (compose again on top
    of theirs). Rerun with the same staged id, it finds its own claim."""
    name_uri = name_uri.rstrip("/")
    n = (version_number(parent) or 0 if parent else 0) + 1
    claim_uri = join(name_uri, CLAIMS, f"{version_name(n)}.json")
    existing = storage.read_bytes(claim_uri) if storage.exists(claim_uri) else None
    if existing is not None:
        return n if _claim_body(existing, claim_uri).get("staged") == staged_id else None
    staged = join(name_uri, STAGED, staged_id)
    with tempfile.TemporaryDirectory(prefix="localcap-snapshot-") as tmp:
        out = Path(tmp)
        written = write_snapshot_metadata(out, snap, f"../{SHARD_STORE}/")
        entries = [{"path": p, **meta} for p, meta in sorted(snap.tars.items())]
        for local in written:
            rel = local.relative_to(out).as_posix()
            entries.append({"path": rel, "size": local.stat().st_size, "sha256": file_sha256(local)})
        dataset_json = json.dumps(snap.info, indent=1).encode()
        entries.append({"path": DATASET, "size": len(dataset_json), "sha256": hashlib.sha256(dataset_json).hexdigest()})
        for local in written:
            storage.put_file(local, join(staged, local.relative_to(out).as_posix()))
        rejects = body.pop("rejects", None)
        if rejects is not None:
            storage.put_file(rejects, join(staged, REJECTS_FILE))
            entries.append({"path": REJECTS_FILE, "size": rejects.stat().st_size, "sha256": file_sha256(rejects)})
        listing = {"format": SNAPSHOT_FORMAT, "version": version_name(n), "published_at": now(), "files": entries}
        storage.write_bytes(join(staged, FILES), json.dumps(listing, indent=1).encode())
        storage.write_bytes(join(staged, DATASET), dataset_json)
    claim = {"staged": staged_id, "parent": parent, "claimed_at": now(), "host": os.uname().nodename, **body}
    if storage.create_exclusive(claim_uri, json.dumps(claim).encode()):
        return n
    return n if _claim_body(storage.read_bytes(claim_uri), claim_uri).get("staged") == staged_id else None


def _claim_body(raw: bytes, uri: str) -> dict:
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadMetadata(f"{uri}: not JSON") from None
    if not isinstance(body, dict):
        raise BadMetadata(f"{uri}: not a claim")
    return body


def roll_forward(storage: Storage, name_uri: str, n: int) -> bool:
    """Make a claimed version whole from its staged metadata (its descriptors, files.json, then
    dataset.json last); True when it is whole. Idempotent: the publisher that claimed it, its
    rerun, or any later publisher can do it."""
    version_uri = join(name_uri, version_name(n))
    if storage.exists(join(version_uri, DATASET)):
        return True
    claim_uri = join(name_uri, CLAIMS, f"{version_name(n)}.json")
    staged_id = _claim_body(storage.read_bytes(claim_uri), claim_uri).get("staged")
    if not isinstance(staged_id, str) or not HEX64.fullmatch(staged_id):
        log.warning("publish: %s has no staged snapshot to finish it from (claimed by an older localcap?)", claim_uri)
        return False
    staged = join(name_uri, STAGED, staged_id)
    raw = storage.read_bytes(join(staged, FILES))
    entries = parse_files(raw, join(staged, FILES))
    for e in entries:
        if not e["path"].endswith(TAR_SUFFIX) and e["path"] != DATASET:
            storage.write_bytes(join(version_uri, e["path"]), storage.read_bytes(join(staged, e["path"])))
    storage.write_bytes(join(version_uri, FILES), raw)
    storage.write_bytes(join(version_uri, DATASET), storage.read_bytes(join(staged, DATASET)))  # the version is whole from here on
    return True


def finish_claimed(storage: Storage, name_uri: str) -> None:
    """Finish every claimed version whose publisher died before making it whole, and move LATEST
    to the newest: what a publish does before anything else."""
    claimed = _claimed(storage, name_uri)
    for n in claimed:
        if not storage.exists(join(name_uri, version_name(n), DATASET)):
            if roll_forward(storage, name_uri, n):
                log.info("publish: finished %s, which an interrupted publish had claimed", join(name_uri, version_name(n)))
    newest = newest_version(storage, name_uri)
    if newest and _read_latest(storage, name_uri) != newest:
        move_latest(storage, name_uri, version_number(newest))


def snapshot_info(build: dict, parent: Snapshot | None, manifest: pa.Table, name_uri: str, version_parent: str | None,
                  added: int, removed: int, run_id: str | None, note: str | None = None) -> dict:
    """dataset.json of a snapshot: the newest build's card (config, captions, timings, builds), with
    counts and statistics of the whole snapshot, the build's own under `build`, the versions it
    grew from under `history`, and the shard URL lists for PS3's loader."""
    info = {k: v for k, v in build.items() if k not in ("published", "report", "build", "history", "shard_urls")}
    layout = build["layout"]
    info["build"] = {"run_id": build.get("run_id"), "counts": build.get("counts"), "statistics": build.get("statistics")}
    info["counts"] = {**snapshot_counts(manifest), "added": added, "removed": removed}
    info["statistics"] = snapshot_statistics(manifest)
    info["parent"] = version_parent
    entry = {"parent": version_parent, "run_id": run_id, "added": added, "removed": removed, "published_at": now()}
    if note:
        entry["note"] = note
    info["history"] = [*(parent.info.get("history", []) if parent else []), entry]
    info["shard_urls"] = shard_url_lists(name_uri, layout, manifest)
    return info


def publish_version(storage: Storage, dataset_dir: str | Path, name_uri: str, concurrency: int = 8,
                    part_size: int = 64 * 2**20, progress: bool = True,
                    after_upload: Callable[[str], None] | None = None, *, force: bool = False) -> PublishResult:
    """Publish a built dataset directory (local) as the next version of `name_uri`: a snapshot of
    the newest version plus the build's samples it lacks (see the module's docstring).

    A build that adds nothing (no sample, or every sample in the newest version already) publishes
    nothing: the result has `unchanged` set and a `reason`. `force=True` publishes the snapshot
    anyway, as a new version. `after_upload(path)` is called after each new tar lands (progress
    hooks; tests use it to stop a publish half-way)."""
    dataset_dir, name_uri = Path(dataset_dir), name_uri.rstrip("/")
    build = parse_dataset_json((dataset_dir / DATASET).read_bytes(), str(dataset_dir / DATASET))  # missing: not a finished build
    finish_claimed(storage, name_uri)
    up = _Uploader(storage, name_uri, concurrency, part_size, progress, after_upload)
    resumed = False
    with tempfile.TemporaryDirectory(prefix="localcap-publish-") as scratch:
        for _ in range(COMMIT_ATTEMPTS):
            parent_name = newest_version(storage, name_uri)
            parent = read_snapshot(storage, name_uri, parent_name) if parent_name else None
            if parent is not None and parent.layout != build["layout"]:
                raise ValueError(f"{join(name_uri, parent_name)} is {parent.layout}, the build {build['layout']}: one dataset, one layout")
            inc = build_increment(dataset_dir, parent.uids() if parent else set(), Path(scratch))
            if inc.manifest.num_rows == 0 and not force:
                why = ("the build has no samples" if not build["counts"]["samples"]
                       else f"every sample of the build is in {parent_name} already")
                log.info("publish: nothing published to %s: %s", name_uri, why)
                return PublishResult(parent_name, join(name_uri, parent_name) if parent_name else None, 0, 0, 0, False,
                                     _read_latest(storage, name_uri), unchanged=True, reason=why,
                                     **(snapshot_counts(parent.manifest) if parent else {}))
            increment_id = inc.content_id(build["layout"])
            resumed = resumed or storage.exists(join(name_uri, STAGED, f"{increment_id}.pending.json"))
            base = allocate_shards(storage, name_uri, increment_id, len(inc.tars))
            names, tars = up.put(inc, base)
            added = _renamed(inc.manifest, names)
            manifest = pa.concat_tables([parent.manifest.cast(added.schema), added]) if parent else added
            hashes = _joined(parent.hashes if parent else None, inc.hashes, parent is not None)
            staged_id = hashlib.sha256(f"{parent_name}:{increment_id}:{int(force)}".encode()).hexdigest()
            info = snapshot_info(build, parent, manifest, name_uri, parent_name, added.num_rows, 0, build.get("run_id"))
            snap = Snapshot(build["layout"], manifest, hashes, {**(parent.tars if parent else {}), **tars}, info)
            rejects = dataset_dir / REJECTS_FILE
            n = commit(storage, name_uri, snap, staged_id, parent_name,
                       {"increment": increment_id, "rejects": rejects if rejects.exists() else None})
            if n is None:
                log.info("publish: %s was taken by another publisher: composing again on top of it",
                         version_name((version_number(parent_name) or 0 if parent_name else 0) + 1))
                continue
            roll_forward(storage, name_uri, n)
            latest = move_latest(storage, name_uri, n)
            storage.delete(join(name_uri, STAGED, f"{increment_id}.pending.json"))
            return PublishResult(version_name(n), join(name_uri, version_name(n)), up.uploaded, up.skipped, up.sent, resumed,
                                 latest, added=added.num_rows, **snapshot_counts(manifest))
    raise RuntimeError(f"{name_uri}: {COMMIT_ATTEMPTS} other publishes committed first; nothing published, run it again")


def _joined(parent: pa.Table | None, new: pa.Table | None, has_parent: bool) -> pa.Table | None:
    """The snapshot's hashes: the parent's and the increment's (None when a side lacks them: a
    partial index would let duplicates in unnoticed... it is then not written)."""
    if new is None or (has_parent and parent is None):
        return None
    from dedupe.index import with_index_columns

    return pa.concat_tables([with_index_columns(t) for t in ([parent] if parent is not None else []) + [new]])


def move_latest(storage: Storage, name_uri: str, n: int, attempts: int = 100) -> str:
    """Point LATEST at vN, or at a newer complete version, unless it already names a newer one;
    returns what it names. LATEST only ever moves forward: the write is conditional on LATEST being
    what was read (If-Match: its ETag; If-None-Match: * when there is none; locally a compare under
    a lock), and when another publisher moved it in between, it is read again and compared again."""
    pointer = join(name_uri, LATEST)
    for _ in range(attempts):
        data, tag = storage.read_tagged(pointer)
        current = data.decode(errors="replace").strip() if data is not None else None
        current_n = version_number(current) if current else None
        if current_n is not None and current_n >= n:
            return current
        newer = [m for m in _claimed(storage, name_uri) if m > n and storage.exists(join(name_uri, version_name(m), DATASET))]
        target = max([n, *newer])
        if storage.replace_if(pointer, version_name(target).encode(), tag):
            return version_name(target)
        time.sleep(0.05)  # another publisher moved it in between: read it again
    raise RuntimeError(f"{pointer}: could not move it to {version_name(n)} in {attempts} attempts (it kept changing)")


# -- removal and retention -----------------------------------------------------------------------------
def remove_samples(storage: Storage, name_uri: str, uids: set[str] = frozenset(), sources: set[str] = frozenset(),
                   block: bool = False, concurrency: int = 8, part_size: int = 64 * 2**20, progress: bool = True) -> PublishResult:
    """Publish the next version without the samples of these uids or source URIs, rewriting only the
    shards that held them (the others stay shared). `block`: their hashes go to NAME/_blocked/, so
    that no later build ingests them again. ValueError when nothing matches."""
    name_uri = name_uri.rstrip("/")
    finish_claimed(storage, name_uri)
    up = _Uploader(storage, name_uri, concurrency, part_size, progress, None)
    for _ in range(COMMIT_ATTEMPTS):
        parent_name = newest_version(storage, name_uri)
        if parent_name is None:
            raise ValueError(f"{name_uri}: no published version to remove samples from")
        parent = read_snapshot(storage, name_uri, parent_name)
        m = parent.manifest
        hit = pc.or_(pc.is_in(m["uid"], value_set=pa.array(sorted(uids), pa.string())),
                     pc.is_in(m["source"], value_set=pa.array(sorted(sources), pa.string())))
        gone = m.filter(hit)
        if gone.num_rows == 0:
            raise ValueError(f"{join(name_uri, parent_name)} holds no sample with those uids / sources")
        kept = m.filter(pc.invert(hit))
        gone_keys = set(gone["key"].to_pylist())
        affected = sorted(set(gone["shard"].to_pylist()), key=shard_index)
        with tempfile.TemporaryDirectory(prefix="localcap-remove-") as scratch:
            tars: dict[str, list[Path]] = {}
            for first in affected:
                if kept.filter(pc.equal(kept["shard"], first)).num_rows == 0:
                    continue  # the shard held only removed samples: it simply leaves the snapshot
                local = []
                for path in _shard_paths(parent.layout, first):
                    with storage.open_read(join(name_uri, SHARD_STORE, path), seekable=True) as src:
                        filter_tar(src, Path(scratch) / path, lambda k: k not in gone_keys, join(name_uri, SHARD_STORE, path))
                    local.append(Path(scratch) / path)
                tars[first] = local
            moved = kept.filter(pc.is_in(kept["shard"], value_set=pa.array(affected, pa.string())))
            inc = Increment(tars, moved, None, parent.layout)
            increment_id = inc.content_id(f"remove:{parent_name}:{','.join(sorted(gone_keys))}")
            base = allocate_shards(storage, name_uri, increment_id, len(tars))
            names, new_tars = up.put(inc, base)
            stay = kept.filter(pc.invert(pc.is_in(kept["shard"], value_set=pa.array(affected, pa.string()))))
            manifest = pa.concat_tables([stay, _renamed(moved, names).cast(stay.schema)])
            dropped = {p for first in affected for p in _shard_paths(parent.layout, first)}
            hashes = None
            if parent.hashes is not None:
                hashes = parent.hashes.filter(pc.invert(pc.is_in(parent.hashes["uid"], value_set=pa.array(sorted(set(gone["uid"].to_pylist())), pa.string()))))
                if block:
                    blocked = parent.hashes.filter(pc.is_in(parent.hashes["uid"], value_set=pa.array(sorted(set(gone["uid"].to_pylist())), pa.string())))
                    buf = io.BytesIO()
                    pq.write_table(blocked, buf)
                    storage.write_bytes(join(name_uri, BLOCKED, f"blocked-{time.strftime('%Y%m%d-%H%M%S')}-{increment_id[:8]}.parquet"), buf.getvalue())
            elif block:
                raise ValueError(f"{join(name_uri, parent_name)} has no {HASHES_FILE}: its samples' hashes cannot be blocked")
            note = f"removed {gone.num_rows} sample(s){' and blocked them' if block else ''}"
            info = snapshot_info(parent.info, parent, manifest, name_uri, parent_name, 0, gone.num_rows, None, note)
            info["history"][-1]["removed_uids"] = sorted(set(gone["uid"].to_pylist()))
            snap = Snapshot(parent.layout, manifest, hashes, {**{p: v for p, v in parent.tars.items() if p not in dropped}, **new_tars}, info)
            staged_id = hashlib.sha256(f"{parent_name}:{increment_id}".encode()).hexdigest()
            n = commit(storage, name_uri, snap, staged_id, parent_name, {"increment": increment_id, "removed": gone.num_rows})
        if n is None:
            continue
        roll_forward(storage, name_uri, n)
        latest = move_latest(storage, name_uri, n)
        storage.delete(join(name_uri, STAGED, f"{increment_id}.pending.json"))
        return PublishResult(version_name(n), join(name_uri, version_name(n)), up.uploaded, up.skipped, up.sent, False, latest,
                             removed=gone.num_rows, **snapshot_counts(manifest))
    raise RuntimeError(f"{name_uri}: {COMMIT_ATTEMPTS} other publishes committed first; nothing removed, run it again")


@dataclass
class GcPlan:
    kept: list[str]  # the versions kept
    dropped: list[str]  # the versions whose metadata goes
    shards: list[str]  # tar paths in the shard store no kept version references
    bytes: int
    deleted: bool = False
    uploads: list[str] = field(default_factory=list)  # incomplete uploads (S3 multipart; local temporaries) of such tars


def collect_garbage(storage: Storage, name_uri: str, keep: int, delete: bool = False, pending_hours: float = 24.0) -> GcPlan:
    """Keep the newest `keep` versions; list (or, with `delete`, delete) the shard files none of
    them references (those of dropped versions, of removals' rewritten shards, and those a failed
    publish uploaded) and the older versions' metadata. Never a file a kept version needs; never a
    tar with a shard number a publish took less than `pending_hours` ago and has not committed
    (NAME/_staged/*.pending.json: it may be uploading now, or be rerun to finish; `pending_hours` 0
    protects none, even one begun this second); the claims stay, so version numbers go on from
    where they were."""
    if keep < 1:
        raise ValueError("--keep must be at least 1: the newest version is always kept")
    name_uri = name_uri.rstrip("/")
    finish_claimed(storage, name_uri)
    finished = [v.version for v in list_versions(storage, name_uri)]
    kept, dropped = finished[-keep:], finished[:-keep]
    needed: set[str] = set()
    for v in kept:
        needed |= set(read_snapshot(storage, name_uri, v).tars)
    pending: list[range] = []
    cutoff = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - pending_hours * 3600))
    for name in storage.list_prefix(join(name_uri, STAGED)):
        if name.endswith(".pending.json"):
            record = json.loads(storage.read_bytes(join(name_uri, STAGED, name)))
            if pending_hours > 0 and (str(record.get("at", "")) >= cutoff or pending_hours == float("inf")):
                pending.append(range(int(record["shard_base"]), int(record["shard_base"]) + int(record["count"])))
            elif delete:
                storage.delete(join(name_uri, STAGED, name))
    garbage, size, uploads = [], 0, []
    recent = lambda name: any(shard_index(name) in r for r in pending)  # noqa: E731
    for folder in ("image", "text_box", "combined"):
        for name in storage.list_prefix(join(name_uri, SHARD_STORE, folder)):
            path = f"{folder}/{name}"
            if not name.endswith(TAR_SUFFIX) or path in needed or recent(name):
                continue
            garbage.append(path)
            size += storage.size(join(name_uri, SHARD_STORE, path))
        uploads += [f"{folder}/{name}" for name in incomplete_uploads(storage, join(name_uri, SHARD_STORE, folder))
                    if not recent(name)]
    plan = GcPlan(kept, dropped, garbage, size, uploads=uploads)
    if delete:
        for path in garbage:
            storage.delete(join(name_uri, SHARD_STORE, path))
        abort_stale_uploads(storage, [join(name_uri, SHARD_STORE, path) for path in uploads])
        for v in dropped:  # dataset.json first: from then on the version is not listed, whatever else remains
            storage.delete(join(name_uri, v, DATASET))
            for e in parse_files(storage.read_bytes(join(name_uri, v, FILES)), join(name_uri, v, FILES)):
                if not e["path"].endswith(TAR_SUFFIX) and e["path"] != DATASET:
                    storage.delete(join(name_uri, v, e["path"]))
            storage.delete(join(name_uri, v, FILES))
            storage.delete(join(name_uri, v, REPORT_PAGE))  # its thumbnails go with the version's tars
        plan.deleted = True
    return plan


__all__ = ["DESCRIPTORS", "DATASET", "FILES", "LATEST", "CLAIMS", "version_name", "version_number"]
