"""Versions of a dataset: `NAME/vN/` published whole, `NAME/LATEST` naming the newest.

Layout under a dataset name (s3:// or a local path):

    NAME/_claims/vN.json   who took version N (content id, time); created with a conditional PUT
                           (If-None-Match: *), so two publishers never get the same N
    NAME/vN/...            the shard tars, sizes.json, manifest.parquet, wids indexes,
    NAME/vN/files.json     every file's size, sha256 and S3 ETag (what `pull` verifies against),
    NAME/vN/dataset.json   written last: a version exists for readers only once this does
    NAME/LATEST            "vN", moved forward after dataset.json

Publishing uploads shards first (boto3's transfer manager: multipart, bounded concurrency), checks
each object's ETag against the one computed locally, then files.json, dataset.json and LATEST. A
publish that dies leaves a claim and some objects but no dataset.json: readers do not see it, LATEST
does not move, and rerunning the same publish finds its own claim (same content id) and uploads only
what is missing. A publish that fails aborts the multipart uploads it left under NAME/vN/; one that
was killed leaves them (and, to a local NAME, temporary files): the rerun of the same publish aborts
/ removes them before uploading.

A build whose files (dataset.json aside: it holds times) are byte-identical to the newest finished
version's (its files.json: paths and sizes, then sha256) publishes nothing: rebuilding the same
inputs does not make a new version (unless forced).

LATEST only ever moves forward: it is replaced with a conditional write (If-Match on the ETag read,
If-None-Match: * when absent), re-read and retried when another publisher moved it in between.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.shards.layout import SIZES, TAR_SUFFIX, WIDS_INDEXES
from pipeline.shards.metadata import parse_dataset_json
from pipeline.storage import Storage, is_s3, join, split_s3

log = logging.getLogger("localcap")

LATEST = "LATEST"
CLAIMS = "_claims"
FILES = "files.json"
DATASET = "dataset.json"
# Written after the shards, in this order, before dataset.json: small files that describe the tars.
DESCRIPTORS = (SIZES, "manifest.parquet", *WIDS_INDEXES)


def version_name(n: int) -> str:
    return f"v{n}"


def version_number(name: str) -> int | None:
    name = name.rstrip("/").removesuffix(".json")
    return int(name[1:]) if name[:1] == "v" and name[1:].isdigit() else None


# -- reading -------------------------------------------------------------------------------------
def resolve(storage: Storage, uri: str) -> str:
    """The dataset directory `uri` names: itself (it holds dataset.json), NAME/LATEST, or NAME (its LATEST)."""
    uri = uri.rstrip("/")
    if storage.exists(join(uri, DATASET)):
        return uri
    name, pointer = (uri.rsplit("/", 1)[0], uri) if uri.endswith("/" + LATEST) else (uri, join(uri, LATEST))
    if storage.exists(pointer):
        version = storage.read_bytes(pointer).decode().strip()
        if storage.exists(join(name, version, DATASET)):
            return join(name, version)
        raise FileNotFoundError(f"{pointer} names {version}, which has no {DATASET}")
    raise FileNotFoundError(f"{uri}: neither a dataset (no {DATASET}) nor a dataset name (no {LATEST})")


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


def _read_version(storage: Storage, uri: str, version: str, latest: bool) -> VersionInfo:
    """One complete version's listing; a dataset.json or files.json that is not the JSON a publish
    writes gives a VersionInfo whose `broken` says why, instead of an exception."""
    what = DATASET
    try:
        info = parse_dataset_json(storage.read_bytes(join(uri, DATASET)), join(uri, DATASET))  # counts and types checked
        samples, shards, created_at = info["counts"]["samples"], info["counts"]["shards"], info["created_at"]
        what = FILES
        files = json.loads(storage.read_bytes(join(uri, FILES))) if storage.exists(join(uri, FILES)) else {}
        published_at = files.get("published_at")
        if not isinstance(published_at, (str, type(None))):
            raise TypeError(f"published_at is {published_at!r}, not a time")
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:200]
        return VersionInfo(version, uri, 0, 0, "", None, latest, broken=f"{what}: {type(exc).__name__}: {detail}")
    return VersionInfo(version, uri, samples, shards, created_at, published_at, latest)


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


# -- publishing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalFile:
    path: str  # relative to the dataset directory, with "/"
    local: Path
    size: int
    sha256: str
    etag: str  # the S3 ETag an upload with our part size gives


def describe_file(root: Path, local: Path, part_size: int) -> LocalFile:
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
    return LocalFile(local.relative_to(root).as_posix(), local, size, sha.hexdigest(), etag)


def expected_etag(path: Path, part_size: int) -> str:
    return describe_file(path.parent, path, part_size).etag


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def dataset_paths(dataset_dir: Path) -> list[Path]:
    """Every file of a built dataset (dataset.json aside), shard tars first, then the descriptors."""
    paths = sorted(p for p in dataset_dir.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != DATASET)
    return sorted(paths, key=lambda p: (p.suffix != TAR_SUFFIX, p.name in DESCRIPTORS and DESCRIPTORS.index(p.name), str(p)))


def content_id(dataset_dir: Path, paths: list[Path]) -> str:
    """Identifies a build: its dataset.json and descriptors (sizes, manifest: every sample's key and
    uid per shard), which the tars' bytes follow from; cheap, so claiming needs no pass over the tars."""
    h = hashlib.sha256((dataset_dir / DATASET).read_bytes())
    for p in paths:
        if p.suffix != TAR_SUFFIX:
            h.update(p.relative_to(dataset_dir).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def claim_version(storage: Storage, name_uri: str, content_id: str, new_version: bool = False) -> tuple[int, bool]:
    """(version number, resumed): this content's unfinished (or finished) claim if there is one,
    else the next free number, taken with a create-if-absent so that racing publishers differ.
    `new_version`: a finished claim of this content is not taken (an unfinished one still is), so
    the same content becomes a new version (`publish_version(force=True)`)."""
    claims = join(name_uri, CLAIMS)
    taken = sorted(n for n in (version_number(c) for c in storage.list_prefix(claims)) if n is not None)
    for n in reversed(taken):
        claim = json.loads(storage.read_bytes(join(claims, f"{version_name(n)}.json")))
        if claim.get("content_id") == content_id:
            if new_version and storage.exists(join(name_uri, version_name(n), DATASET)):
                continue
            return n, True
    n = (taken[-1] if taken else 0) + 1
    body = {"content_id": content_id, "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": os.uname().nodename}
    while not storage.create_exclusive(join(claims, f"{version_name(n)}.json"), json.dumps(body).encode()):
        n += 1  # another publisher took it between our listing and our PUT
    return n, False


@dataclass
class PublishResult:
    version: str
    uri: str
    uploaded: int
    skipped: int
    bytes_uploaded: int
    resumed: bool
    latest: str | None  # what LATEST names after the publish (None: no LATEST, only for an unchanged publish)
    unchanged: bool = False  # the build is byte-identical to the newest version: nothing published, `version` is that one


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
        with storage.atomic_path(uri) as tmp, open(f.local, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        if file_sha256(Path(uri)) != f.sha256:
            raise OSError(f"{uri}: sha256 differs after the copy")


def _already_there(storage: Storage, f: LocalFile, uri: str) -> bool:
    if is_s3(uri):
        return storage.etag(uri) == f.etag
    return Path(uri).is_file() and Path(uri).stat().st_size == f.size and file_sha256(Path(uri)) == f.sha256


def _read_latest(storage: Storage, name_uri: str) -> str | None:
    pointer = join(name_uri, LATEST)
    return storage.read_bytes(pointer).decode(errors="replace").strip() if storage.exists(pointer) else None


def newest_version(storage: Storage, name_uri: str) -> str | None:
    """The newest finished version of a dataset name: the one LATEST names (when that is a vN with
    a dataset.json), else the highest claimed vN that has a dataset.json; None when there is none."""
    current = _read_latest(storage, name_uri)
    if current is not None and version_number(current) is not None and current == version_name(version_number(current)) \
            and storage.exists(join(name_uri, current, DATASET)):
        return current
    for n in reversed(_claimed(storage, name_uri)):
        if storage.exists(join(name_uri, version_name(n), DATASET)):
            return version_name(n)
    return None


def _published_files(storage: Storage, version_uri: str) -> dict[str, tuple[int, str]] | None:
    """{path: (size, sha256)} of a version's files listing, dataset.json aside; None when the
    listing is absent or not what a publish writes (it is read from storage: not trusted)."""
    uri = join(version_uri, FILES)
    try:
        if not storage.exists(uri):
            return None
        listing = json.loads(storage.read_bytes(uri))
        out: dict[str, tuple[int, str]] = {}
        for entry in listing["files"]:
            path, size, sha = entry["path"], entry["size"], entry["sha256"]
            if not (isinstance(path, str) and isinstance(sha, str) and isinstance(size, int)) or isinstance(size, bool):
                return None
            if path == DATASET:
                continue
            if path in out:  # listed twice: not a listing a publish writes
                return None
            out[path] = (size, sha)
        return out
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, FileNotFoundError):  # JSONDecodeError / UnicodeDecodeError are ValueErrors
        return None


def identical_to(storage: Storage, dataset_dir: Path, paths: list[Path], version_uri: str) -> bool:
    """Whether the files of a local build (`paths`, dataset.json aside) are those `version_uri`'s
    files listing describes: the same paths and sizes (cheap, checked first), then the same sha256."""
    published = _published_files(storage, version_uri)
    if published is None:
        return False
    local = {p.relative_to(dataset_dir).as_posix(): p for p in paths}
    if local.keys() != published.keys():
        return False
    if any(p.stat().st_size != published[rel][0] for rel, p in local.items()):
        return False
    return all(file_sha256(p) == published[rel][1] for rel, p in local.items())


def publish_version(storage: Storage, dataset_dir: str | Path, name_uri: str, concurrency: int = 8,
                    part_size: int = 64 * 2**20, progress: bool = True,
                    after_upload: Callable[[str], None] | None = None, *, force: bool = False) -> PublishResult:
    """Publish a built dataset directory (local) as the next version of `name_uri`.

    A build whose files (shard tars and descriptors; dataset.json, which holds times, aside) are
    byte-identical to the newest finished version's is not published: the result names that version,
    with `unchanged` set, and nothing is claimed, uploaded or moved. `force=True` publishes it anyway,
    as a new version.

    `after_upload(path)` is called after each file lands (progress hooks; tests use it to stop a
    publish half-way)."""
    dataset_dir, name_uri = Path(dataset_dir), name_uri.rstrip("/")
    dataset_json = (dataset_dir / DATASET).read_bytes()  # missing: not a finished build
    paths = dataset_paths(dataset_dir)
    if not force:
        newest = newest_version(storage, name_uri)
        if newest is not None and identical_to(storage, dataset_dir, paths, join(name_uri, newest)):
            newest_uri = join(name_uri, newest)
            log.info("publish: %s is identical to %s: no new version", dataset_dir, newest_uri)
            return PublishResult(newest, newest_uri, 0, len(paths), 0, False, _read_latest(storage, name_uri), unchanged=True)
    content = content_id(dataset_dir, paths)
    n, resumed = claim_version(storage, name_uri, content, new_version=force)
    version_uri = join(name_uri, version_name(n))
    if resumed:
        log.info("publish: resuming %s (an earlier publish of the same content)", version_uri)

    uploaded = skipped = sent = 0
    shards = [p for p in paths if p.suffix == TAR_SUFFIX]
    rest = [p for p in paths if p.suffix != TAR_SUFFIX]
    files: list[LocalFile] = []
    bar = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, desc=f"publish {version_name(n)}",
               disable=not progress)
    # Few big files: parallel across files; one big file: parallel parts (the transfer manager).
    per_file = max(1, concurrency // max(1, min(concurrency, len(shards))))

    def put(local: Path) -> tuple[LocalFile, int]:
        f = describe_file(dataset_dir, local, part_size)  # hashed in the upload's thread: overlaps other uploads
        uri = join(version_uri, f.path)
        if resumed and _already_there(storage, f, uri):
            bar.update(f.size)
            return f, 0
        _upload(storage, f, uri, part_size, per_file)
        bar.update(f.size)
        if after_upload:
            after_upload(f.path)
        return f, f.size

    # What a killed earlier publish of this version left: incomplete multipart uploads (S3), or
    # temporary files (a local NAME). Its claim is this content's, so nobody else uploads here.
    stale = storage.remove_temporaries(version_uri, recursive=True)
    if stale:
        log.info("publish: removed %d incomplete upload(s) / temporary file(s) an interrupted publish left in %s",
                 stale, version_uri)
    try:
        for group in (shards, rest):  # descriptors only once every tar is in
            pool = ThreadPoolExecutor(concurrency)
            try:
                for f, size in pool.map(put, group):
                    files.append(f)
                    uploaded += size > 0
                    skipped += size == 0
                    sent += size
            finally:
                # On a failure the uploads not yet started are dropped; the running ones end first.
                pool.shutdown(wait=True, cancel_futures=True)
    except BaseException:
        # boto3 aborts a multipart upload whose own part failed; this takes whatever else is left
        # (a transfer cut short by the failure of another file), so no parts stay stored and billed.
        try:
            aborted = storage.remove_temporaries(version_uri, recursive=True)
            if aborted:
                log.info("publish: aborted %d incomplete upload(s) under %s", aborted, version_uri)
        except (OSError, *_s3_errors()) as exc:  # the publish's own error is the one to report
            log.warning("publish: could not abort the incomplete uploads under %s: %s", version_uri, exc)
        raise
    finally:
        bar.close()
    published_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    listing = {"version": version_name(n), "published_at": published_at, "content_id": content,
               "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "etag": f.etag} for f in files]
               + [{"path": DATASET, "size": len(dataset_json), "sha256": hashlib.sha256(dataset_json).hexdigest()}]}
    storage.write_bytes(join(version_uri, FILES), json.dumps(listing, indent=1).encode())
    storage.write_bytes(join(version_uri, DATASET), dataset_json)  # the version exists from here on
    latest = move_latest(storage, name_uri, n)
    return PublishResult(version_name(n), version_uri, uploaded, skipped, sent, resumed, latest)


def _s3_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def move_latest(storage: Storage, name_uri: str, n: int, attempts: int = 100) -> str:
    """Point LATEST at vN, or at a newer complete version, unless it already names a newer one;
    returns what it names. LATEST only ever moves forward: the write is conditional on LATEST being
    what was read (If-Match: its ETag; If-None-Match: * when there is none; locally a compare under
    a lock), and when another publisher moved it in between, it is read again and compared again.
    So two publishers finishing together end with LATEST at the higher version, whichever writes
    last. A newer version that is complete (its dataset.json is there) but not yet named, because
    its publisher died just before this step or is about to take it, is taken instead of vN."""
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


def _claimed(storage: Storage, name_uri: str) -> list[int]:
    """Version numbers claimed under a dataset name, ascending."""
    return sorted(n for n in (version_number(c) for c in storage.list_prefix(join(name_uri, CLAIMS))) if n is not None)
