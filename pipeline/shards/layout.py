"""Names and folders of a dataset version (DESIGN.md, "Shards")."""

from __future__ import annotations

import re

IMAGE_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
TAR_MEMBER_OVERHEAD = 512  # one ustar header per member; data is padded to 512 bytes
TAR_END = 10240  # two zero blocks, padded by tarfile to a whole 10 KiB record (upper bound)
LAYOUT_FOLDERS = {"paired": ("image", "text_box"), "combined": ("combined",)}
TAR_STEM = {"image": "image", "text_box": "text_box", "combined": "shard"}  # folder -> its tars' stem


def shard_files(layout: str, index: int) -> dict[str, str]:
    """Folder -> tar file name of shard `index` for a layout."""
    return {folder: f"{TAR_STEM[folder]}_{index:06d}.tar" for folder in LAYOUT_FOLDERS[layout]}


def tar_name_pattern(folder: str) -> re.Pattern:
    """What a tar of `folder` is called (shard_files), for names read from elsewhere."""
    return re.compile(rf"{re.escape(TAR_STEM[folder])}_\d{{6,}}\.tar")


def folders(layout: str) -> list[str]:
    return list(LAYOUT_FOLDERS[layout])


def member_size(n_bytes: int) -> int:
    return TAR_MEMBER_OVERHEAD + -(-n_bytes // 512) * 512
