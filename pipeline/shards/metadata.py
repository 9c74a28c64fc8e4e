"""Checks on a dataset's metadata and tars as read from elsewhere (a published version, a pulled
folder): untrusted input. Small pure functions; each refuses with `BadMetadata`, one line naming
the file and what is wrong with it.

- `parse_dataset_json(raw, uri)`: dataset.json, with its layout and non-negative integer counts.
- `parse_sizes(raw, uri, folder)`: a folder's sizes.json, tar file name -> non-negative sample count.
- `parse_files(raw, uri)`: files.json's listing, each path one the dataset layout knows (`check_path`),
  sizes non-negative integers and sha256 values 64 hex digits.
- `check_path(path)`: a file path of a dataset version, relative, without `..`, empty or absolute
  parts, naming a file of the layout (pipeline/dataset_format.py).
- `check_member(member, uri)`: a tar member the readers accept: a regular file (or a directory)
  with a plain relative name; links and devices are refused.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path, PurePosixPath

from pipeline.dataset_format import (
    DATASET,
    FILES,
    HASHES_FILE,
    MANIFEST_FILE,
    REJECTS_FILE,
    LAYOUT_FOLDERS,
    SIZES,
    TAR_STEM,
    TAR_SUFFIX,
    WIDS_INDEXES,
    tar_name_pattern,
)

LAYOUTS = tuple(LAYOUT_FOLDERS)
TOP_LEVEL = frozenset({DATASET, FILES, MANIFEST_FILE, HASHES_FILE, REJECTS_FILE, *WIDS_INDEXES})
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_METADATA_BYTES = 256 * 2**20  # a files.json / sizes.json / dataset.json above this is not ours


class BadMetadata(ValueError):
    """A dataset's metadata file (or tar) is malformed or unsafe; the message is one line."""


def _fail(uri: str, reason: str) -> BadMetadata:
    return BadMetadata(f"{uri}: {reason}")


def _count(value, uri: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(uri, f"{what} is {value!r}, not an integer")
    if value < 0:
        raise _fail(uri, f"{what} is {value}, a negative count")
    return value


def _json(raw: bytes | str, uri: str):
    if len(raw) > MAX_METADATA_BYTES:
        raise _fail(uri, f"{len(raw)} bytes, too large for a metadata file")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(uri, f"not JSON ({str(exc).splitlines()[0]})") from None


def check_path(path) -> str:
    """`path` if it names a file of a dataset version (relative, "/"-separated); else BadMetadata."""
    if not isinstance(path, str) or not path:
        raise BadMetadata(f"file path {path!r} is not a non-empty string")
    if "\\" in path or "\0" in path or any(ord(c) < 32 for c in path):
        raise BadMetadata(f"file path {path!r} has a backslash or control character")
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        raise BadMetadata(f"file path {path!r} is absolute")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BadMetadata(f"file path {path!r} has an empty, '.' or '..' part")
    if len(parts) == 1 and path in TOP_LEVEL:
        return path
    if len(parts) == 2 and parts[0] in TAR_STEM and (parts[1] == SIZES or tar_name_pattern(parts[0]).fullmatch(parts[1])):
        return path
    raise BadMetadata(f"file path {path!r} is not a file of a dataset version (tars, sizes.json, manifest, wids indexes, dataset.json)")


def safe_destination(dest: Path, path: str) -> Path:
    """dest / path, checked (`check_path`) and resolving under `dest` (no symlinked folder leading out)."""
    check_path(path)
    target = dest / PurePosixPath(path)
    root = dest.resolve()
    if not target.resolve().is_relative_to(root):
        raise BadMetadata(f"file path {path!r} resolves outside {dest} ({target.resolve()})")
    return target


def parse_dataset_json(raw: bytes | str, uri: str) -> dict:
    """dataset.json's content, its layout known and its counts non-negative integers."""
    info = _json(raw, uri)
    if not isinstance(info, dict):
        raise _fail(uri, f"a JSON {type(info).__name__}, not an object")
    if info.get("layout") not in LAYOUTS:
        raise _fail(uri, f"layout is {info.get('layout')!r}, not one of {', '.join(LAYOUTS)}")
    for field in ("name", "run_id", "created_at"):
        if field in info and not isinstance(info[field], str):
            raise _fail(uri, f"{field} is {info[field]!r}, not a string")
    counts = info.get("counts")
    if not isinstance(counts, dict):
        raise _fail(uri, f"counts is {counts!r}, not an object")
    for field in ("samples", "shards"):
        if field not in counts:
            raise _fail(uri, f"counts.{field} is missing")
    for field in ("samples", "shards", "inputs", "rejected"):
        if field in counts:
            _count(counts[field], uri, f"counts.{field}")
    by_reason = counts.get("rejected_by_reason", {})
    if not isinstance(by_reason, dict):
        raise _fail(uri, f"counts.rejected_by_reason is {by_reason!r}, not an object")
    for reason, n in by_reason.items():
        _count(n, uri, f"counts.rejected_by_reason.{reason}")
    for field in ("statistics", "timings", "captions"):
        if info.get(field) is not None and not isinstance(info[field], dict):
            raise _fail(uri, f"{field} is {info[field]!r}, not an object")
    return info


def parse_sizes(raw: bytes | str, uri: str, folder: str | None = None) -> dict[str, int]:
    """A folder's sizes.json: {tar file name: samples}, names plain tar names of `folder`
    (image_NNNNNN.tar in image/, ...; taken from `uri` when not given), counts non-negative integers."""
    sizes = _json(raw, uri)
    if not isinstance(sizes, dict):
        raise _fail(uri, f"a JSON {type(sizes).__name__}, not an object of tar name -> sample count")
    folder = folder or str(uri).replace("\\", "/").rstrip("/").split("/")[-2:][0]
    pattern = tar_name_pattern(folder) if folder in TAR_STEM else re.compile(rf"[A-Za-z_]+_\d{{6,}}{re.escape(TAR_SUFFIX)}")
    for name, n in sizes.items():
        if not pattern.fullmatch(name):
            raise _fail(uri, f"{name!r} is not a tar name of {folder}/ (e.g. {TAR_STEM.get(folder, 'image')}_000000.tar)")
        _count(n, uri, f"the count of {name}")
    return sizes


def parse_files(raw: bytes | str, uri: str) -> list[dict]:
    """files.json's listing: [{path, size, sha256, ...}], every path checked, no path twice."""
    listing = _json(raw, uri)
    if not isinstance(listing, dict) or not isinstance(listing.get("files"), list):
        raise _fail(uri, "not an object with a list of files")
    seen: set[str] = set()
    for i, entry in enumerate(listing["files"]):
        if not isinstance(entry, dict):
            raise _fail(uri, f"entry {i} is {entry!r}, not an object")
        try:
            path = check_path(entry.get("path"))
        except BadMetadata as exc:
            raise _fail(uri, str(exc)) from None
        if path in seen:
            raise _fail(uri, f"file path {path!r} is listed twice")
        seen.add(path)
        _count(entry.get("size"), uri, f"the size of {path}")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            raise _fail(uri, f"the sha256 of {path} is {sha!r}, not 64 lowercase hex digits")
        if "etag" in entry and not isinstance(entry["etag"], str):
            raise _fail(uri, f"the etag of {path} is {entry['etag']!r}, not a string")
    return listing["files"]


def check_member(member: tarfile.TarInfo, uri: str) -> bool:
    """True for a regular file member, False for a directory (skipped); BadMetadata for anything
    else (symlinks, hard links, devices, FIFOs) or a name that is absolute or has `..`."""
    name = member.name
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        raise _fail(uri, f"tar member {name!r} has an absolute or '..' name")
    if member.isreg():
        return True
    if member.isdir():
        return False
    kind = "a symlink" if member.issym() else "a hard link" if member.islnk() else "not a regular file"
    target = f" -> {member.linkname}" if member.linkname else ""
    raise _fail(uri, f"tar member {name!r} is {kind}{target}; refused")


def check_tar(path: str | Path, uri: str) -> int:
    """Every member of a local tar checked (`check_member`), headers only; its file members."""
    files = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                files += check_member(member, uri)
    except tarfile.TarError as exc:
        raise _fail(uri, f"not a readable tar ({exc})") from None
    return files
