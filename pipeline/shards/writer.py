"""Write tar shards byte-for-byte reproducibly (fixed mtime, owner and mode), so reruns match."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable


def tar_bytes_into(fileobj, members: Iterable[tuple[str, bytes]]) -> None:
    """Write (name, data) members, in order, as a ustar archive into an open binary file."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> None:
    with open(path, "wb") as f:
        tar_bytes_into(f, members)
