"""One way to read, list and atomically write local paths and s3:// URIs.

Local writes go to a temporary name in the target folder and are renamed into place; an S3 object
appears whole or not at all (a single PUT, or a multipart upload completed at the end). boto3 honours
AWS_ENDPOINT_URL, so a local S3 endpoint (moto, MinIO) works without code changes; the config's
`storage.endpoint_url` overrides it. A `Storage` pickles without its client, so Ray tasks get one.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import io
import mimetypes
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

_WILDCARDS = "*?["

# A writer's temporary file: `.NAME.localcap-tmp-XXXXXXXX.part` beside the NAME it becomes. The
# recogniser also takes the older `.NAME.XXXXXXXX.part` (tempfile.mkstemp's) that earlier versions left.
TEMP_TAG = "localcap-tmp-"
_TEMP_RE = re.compile(r"\.(?P<target>.+)\.(?:" + re.escape(TEMP_TAG) + r")?[a-z0-9_]{8}\.part\Z")


def temp_name(name: str) -> str:
    """A fresh temporary name for a file that will become `name` (a bare file name, no folder)."""
    return f".{name}.{TEMP_TAG}{secrets.token_hex(4)}.part"


def temp_target(name: str) -> str | None:
    """The file name a temporary made by temp_name (or an older mkstemp one) was to become; None
    when `name` is not such a temporary."""
    m = _TEMP_RE.match(name)
    return m.group("target") if m else None


def is_temp_name(name: str) -> bool:
    return temp_target(name) is not None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def first_wildcard(pattern: str) -> int:
    """Index of the first glob character, or -1 when the pattern is a plain path."""
    return min((pattern.find(c) for c in _WILDCARDS if c in pattern), default=-1)


def glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regex with local `glob.glob(recursive=True)` semantics: `*` stays within a folder,
    `**/` matches zero or more folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            close = pattern.index("]", i + 2)
            body = pattern[i + 1 : close]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = close + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


class S3RangeFile(io.RawIOBase):
    """A seekable read-only view of an S3 object that fetches only the byte ranges asked for."""

    def __init__(self, storage: Storage, uri: str):
        self._storage, (self._bucket, self._key) = storage, split_s3(uri)
        self._size = storage.size(uri)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        rng = f"bytes={self._pos}-{self._pos + n - 1}"
        data = self._storage.s3.get_object(Bucket=self._bucket, Key=self._key, Range=rng)["Body"].read()
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass(frozen=True)
class FileEntry:
    uri: str
    size: int
    version: str = ""  # local mtime in ns, or the S3 ETag: a changed file gets a new fingerprint
    error: str = ""  # set (only by list_files(..., unreadable=True)) for a folder or file that could not be read
    is_dir: bool = False  # the entry is an unreadable folder: nothing under it was listed


def _error_text(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def _may_hold(parts: tuple[str, ...], pats: list[str]) -> bool:
    """Whether a folder at `parts` (below a glob's fixed folder) can hold a match of the glob's
    remaining components `pats`; `**` matches any number of folders."""
    if not pats:
        return False
    if pats[0] == "**":
        return True
    if not parts:
        return True
    return fnmatch.fnmatchcase(parts[0], pats[0]) and _may_hold(parts[1:], pats[1:])


S3_CLIENT_RETRIES = 5  # attempts per request (adaptive back-off): a dead endpoint fails in seconds, not minutes
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 120  # per socket read, not per transfer: a multipart part streams for longer


def remote_failure(exc: BaseException, endpoint: str | None = None, bucket: str | None = None) -> str | None:
    """One line for an S3 failure an operator can act on (endpoint unreachable, credentials missing
    or refused, bucket missing, access denied), naming the endpoint and what to fix; None when
    `exc` is not one of them (a bug: the traceback is then the right thing to show)."""
    try:
        from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError,
                                         PartialCredentialsError, ReadTimeoutError)
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return None
    where = endpoint or os.environ.get("AWS_ENDPOINT_URL") or getattr(exc, "kwargs", {}).get("endpoint_url") or "AWS S3"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return f"cannot reach the S3 endpoint {where} (storage.endpoint_url or AWS_ENDPOINT_URL; is it up?)"
    if isinstance(exc, ReadTimeoutError):
        return f"the S3 endpoint {where} stopped answering (read timeout); rerun to resume"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code, bucket = str(error.get("Code", "")), error.get("BucketName") or bucket
        what = f"bucket {bucket!r}" if bucket else "the bucket"
        if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and exc.operation_name == "HeadBucket"):
            return f"{what} does not exist at {where} (create it, or fix the s3:// name)"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "ExpiredToken", "InvalidToken"):
            return f"{where} refused the credentials ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile"
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return f"access denied at {where} ({exc.operation_name} on {what}): the credentials lack the permission"
    return None


class Storage:
    """Local filesystem and S3 behind one small interface."""

    def __init__(self, endpoint_url: str | None = None, region: str | None = None):
        self.endpoint_url = endpoint_url
        self.region = region
        self._client = None

    def __getstate__(self):
        return {"endpoint_url": self.endpoint_url, "region": self.region}

    def __setstate__(self, state):
        self.__init__(**state)

    def resolved_endpoint(self) -> str | None:
        """The S3 endpoint in use: the configured one, else AWS_ENDPOINT_URL, else AWS's own."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    def resolved_region(self) -> str:
        return self.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    @property
    def s3(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.resolved_endpoint(),
                region_name=self.resolved_region(),
                config=Config(retries={"max_attempts": S3_CLIENT_RETRIES, "mode": "adaptive"}, signature_version="s3v4",
                              connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S),
            )
        return self._client

    # -- reading -------------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return Path(uri).read_bytes()

    def open_read(self, uri: str, seekable: bool = False, buffer_size: int = 1 << 20) -> BinaryIO:
        """A binary file to read from: local files directly; S3 as one streamed GET, or, when the
        reader must seek (Parquet footers), as ranged GETs of just the bytes asked for."""
        if not is_s3(uri):
            return open(uri, "rb")
        if seekable:
            return io.BufferedReader(S3RangeFile(self, uri), buffer_size=buffer_size)
        bucket, key = split_s3(uri)
        return self.s3.get_object(Bucket=bucket, Key=key)["Body"]

    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                self.s3.head_object(Bucket=bucket, Key=key)
                return True
            except self.s3.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
        return Path(uri).exists()

    def size(self, uri: str) -> int:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return int(self.s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
        return Path(uri).stat().st_size

    def list_files(self, pattern: str, extensions: list[str] | None = None, unreadable: bool = False) -> list[FileEntry]:
        """Files under a folder / prefix, or matching a glob; sorted by URI, hidden files skipped.

        A local root (the folder, or a glob's fixed part) that cannot be read raises its OSError (a
        missing folder: FileNotFoundError; a glob whose fixed part is missing lists nothing). Below
        it, a sub-folder that cannot be listed, or a file that cannot be stat'ed, is skipped, or,
        with `unreadable=True`, returned as a FileEntry whose `error` says why (`is_dir` for a
        folder: nothing under it was listed), so that the caller can account for it.
        """
        entries = self._list_s3(pattern) if is_s3(pattern) else self._list_local(pattern, unreadable)
        if extensions:
            wanted = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
            entries = [e for e in entries if e.is_dir or os.path.splitext(e.uri)[1].lower() in wanted]
        return sorted(entries, key=lambda e: e.uri)

    def _list_local(self, pattern: str, unreadable: bool = False) -> list[FileEntry]:
        """Walks with os.scandir (glob and Path.rglob would silently skip unreadable folders).
        Folder sources do not follow symlinked folders (as Path.rglob); globs do (as glob.glob)."""
        cut = first_wildcard(pattern)
        if cut >= 0:
            base = os.path.dirname(pattern[:cut])
            rel_pattern = pattern[len(base):].lstrip("/")
            root, matcher, pats, follow = str(Path(base or ".")), glob_regex(rel_pattern), rel_pattern.split("/"), True
            if not os.path.isdir(root):
                return []
        else:
            root, matcher, pats, follow = str(Path(pattern)), None, None, False
            if os.path.isfile(root):
                st = os.stat(root)
                return [FileEntry(root, st.st_size, str(st.st_mtime_ns))]
            if not os.path.isdir(root):
                raise FileNotFoundError(f"source not found: {pattern}")
        out: list[FileEntry] = []
        seen_dirs: set[tuple[int, int]] = set()  # (device, inode) of folders walked: symlink loops end
        stack: list[tuple[str, tuple[str, ...]]] = [(root, ())]
        while stack:
            folder, rel = stack.pop()
            try:
                with os.scandir(folder) as it:
                    found = list(it)
                if follow:
                    st = os.stat(folder)
                    if (st.st_dev, st.st_ino) in seen_dirs:
                        continue
                    seen_dirs.add((st.st_dev, st.st_ino))
            except OSError as exc:
                if not rel:
                    raise  # the root itself: the caller's error, not a reject
                if unreadable:
                    out.append(FileEntry(str(Path(folder)), 0, error=f"unreadable folder, nothing under it was listed: "
                                         f"{_error_text(exc)}", is_dir=True))
                continue
            for entry in found:
                if entry.name.startswith("."):  # only names below the listed folder make a file hidden
                    continue
                sub = rel + (entry.name,)
                path = str(Path(entry.path))
                try:
                    if entry.is_dir(follow_symlinks=follow):
                        if pats is None or _may_hold(sub, pats):
                            stack.append((entry.path, sub))
                        continue
                    if not entry.is_file() or (matcher is not None and not matcher.match("/".join(sub))):
                        continue
                    st = entry.stat()
                except OSError as exc:  # e.g. a folder that can be read but not searched
                    if not unreadable:
                        raise
                    out.append(FileEntry(path, 0, error=f"unreadable file: {_error_text(exc)}"))
                    continue
                out.append(FileEntry(path, st.st_size, str(st.st_mtime_ns)))
        return out

    def _list_s3(self, pattern: str) -> list[FileEntry]:
        """A prefix is a folder (`s3://b/raw` lists `raw/...`, not `raw2/`); globs match as local ones do."""
        bucket, key = split_s3(pattern)
        cut = first_wildcard(key)
        if cut < 0:
            folder, matcher = (key.rstrip("/") + "/" if key else ""), None
        else:
            folder, matcher = key[: key.rfind("/", 0, cut) + 1], glob_regex(key)
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            for obj in page.get("Contents", []):
                name = obj["Key"]
                # Only names below the listed folder make a file hidden.
                if name.endswith("/") or any(p.startswith(".") for p in name[len(folder):].split("/")):
                    continue
                if matcher and not matcher.match(name):
                    continue
                out.append(FileEntry(f"s3://{bucket}/{name}", int(obj["Size"]), obj.get("ETag", "").strip('"')))
        if not out and cut < 0 and key and not key.endswith("/") and self.exists(pattern):
            out.append(FileEntry(pattern, self.size(pattern)))  # the prefix names one object
        return out

    def list_prefix(self, uri: str) -> list[str]:
        """Names directly inside a folder / prefix (no recursion), sorted; empty if absent."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            prefix = key.rstrip("/") + "/" if key else ""  # "" lists the bucket's top level
            names = []
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                names += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
            return sorted(names)
        root = Path(uri)
        return sorted(p.name for p in root.iterdir() if p.is_file()) if root.is_dir() else []

    def list_dirs(self, uri: str) -> list[str]:
        """Names of the sub-folders (S3: common prefixes) directly inside a folder, sorted."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            prefix = key.rstrip("/") + "/" if key else ""
            names = []
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
            return sorted(names)
        root = Path(uri)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    # -- writing -------------------------------------------------------------------------------
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the whole new one. On S3 the object's
        Content-Type follows its extension, so that a browser shows a report page (and its
        thumbnails) opened from a link instead of downloading it."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self.s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType=mimetypes.guess_type(key)[0] or "binary/octet-stream")
            return
        with self.atomic_path(uri) as tmp:
            Path(tmp).write_bytes(data)

    def put_file(self, local: str | Path, uri: str) -> None:
        """Copy a local file to `uri` atomically without holding it in memory (S3: boto3's managed,
        multipart upload, so no single-PUT size limit)."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self.s3.upload_file(str(local), bucket, key)
            return
        with self.atomic_path(uri) as tmp:
            shutil.copyfile(local, tmp)

    @staticmethod
    def _new_temp(folder: str | Path, name: str) -> str:
        """Create (O_EXCL, mode 0600) and return a temp_name(name) file in `folder`."""
        while True:
            path = os.path.join(folder, temp_name(name))
            try:
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                return path
            except FileExistsError:
                continue

    @contextlib.contextmanager
    def atomic_path(self, uri: str) -> Iterator[str]:
        """Yield a local file path to fill; on success it becomes `uri` whole, on error nothing does.

        Locally the file is a temp_name() beside the target (a crash can leave it: remove_temporaries
        takes it away); for S3 it is in the system's temporary folder, then uploaded."""
        if is_s3(uri):
            tmp = self._new_temp(tempfile.gettempdir(), uri.rsplit("/", 1)[-1] or "object")
            try:
                yield tmp
                bucket, key = split_s3(uri)
                self.s3.upload_file(tmp, bucket, key)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._new_temp(target.parent, target.name)
        try:
            yield tmp
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Create `uri` only if nothing is there (S3: a conditional PUT, If-None-Match: *; local:
        O_EXCL). True if this call created it; False if it already existed. Two callers racing
        for one name: exactly one gets True."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                self.s3.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except self.s3.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                    return False
                raise
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def etag(self, uri: str) -> str | None:
        """The S3 ETag (quotes stripped), or None for a missing object or a local path."""
        if not is_s3(uri):
            return None
        bucket, key = split_s3(uri)
        try:
            return self.s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        except self.s3.exceptions.ClientError:
            return None

    def presigned_url(self, uri: str, expires_s: int) -> str:
        """An https GET URL of an s3:// object that anyone holding it may open for `expires_s` seconds
        (SigV4: at most 7 days, and never longer than the credentials that signed it)."""
        bucket, key = split_s3(uri)
        return self.s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expires_s))

    def delete(self, uri: str) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self.s3.delete_object(Bucket=bucket, Key=key)
        else:
            with contextlib.suppress(FileNotFoundError):
                Path(uri).unlink()

    # -- conditional replace (LATEST) ----------------------------------------------------------
    def read_tagged(self, uri: str) -> tuple[bytes | None, str | None]:
        """(content, tag) of `uri`, or (None, None) when it is missing. The tag is the S3 ETag
        (local: the sha256 of the content); replace_if(uri, data, tag) succeeds only while it holds."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                got = self.s3.get_object(Bucket=bucket, Key=key)
            except self.s3.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None, None
                raise
            return got["Body"].read(), got["ETag"].strip('"')
        try:
            data = Path(uri).read_bytes()
        except FileNotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()

    def replace_if(self, uri: str, data: bytes, tag: str | None) -> bool:
        """Write `data` to `uri` only if it still has the tag read_tagged gave (None: only if it is
        still missing); True if written, False if someone changed it in between (read it again).

        S3: a conditional PUT (If-Match: ETag, or If-None-Match: *), atomic on the server on AWS S3
        and MinIO; a store that ignores these headers makes it a plain PUT. Local: compare and
        rename under an exclusive flock of the folder, which also removes this name's stale temporaries."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            cond = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
            try:
                self.s3.put_object(Bucket=bucket, Key=key, Body=data, **cond)
                return True
            except self.s3.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey", "404"):
                    return False  # changed, racing, or deleted since it was read
                raise
        import fcntl

        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for name in os.listdir(target.parent):  # only one writer of this name holds the lock
                if temp_target(name) == target.name:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(target.parent / name)
            if self.read_tagged(uri)[1] != tag:
                return False
            with self.atomic_path(uri) as tmp:
                Path(tmp).write_bytes(data)
            return True
        finally:
            os.close(fd)  # releases the lock

    # -- crash leftovers -----------------------------------------------------------------------
    def list_uploads(self, uri: str) -> list[tuple[str, str]]:
        """(key, upload id) of the incomplete S3 multipart uploads under a folder / prefix."""
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        out = []
        for page in self.s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            out += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
        return out

    def abort_uploads(self, uri: str) -> int:
        """Abort every incomplete S3 multipart upload under a folder / prefix (their parts are
        stored, and billed, until then); the number aborted."""
        bucket, _ = split_s3(uri)
        n = 0
        for key, upload_id in self.list_uploads(uri):
            try:
                self.s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
                n += 1
            except self.s3.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("NoSuchUpload", "404"):
                    raise
        return n

    def remove_temporaries(self, uri: str, recursive: bool = False) -> int:
        """Remove what crashed writers left under a folder: local temporaries (temp_name's pattern;
        with `recursive`, in its sub-folders too, hidden ones skipped); under an s3:// prefix, the
        incomplete multipart uploads (always recursive). Only for a folder no live writer is writing
        to (the same run id's earlier attempts). Returns how many were removed."""
        if is_s3(uri):
            return self.abort_uploads(uri)
        root = Path(uri)
        if not root.is_dir():
            return 0
        n = 0
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
            for name in names:
                if is_temp_name(name):
                    try:
                        os.unlink(os.path.join(folder, name))
                        n += 1
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        if exc.errno not in (errno.EACCES, errno.EPERM):
                            raise
        return n
