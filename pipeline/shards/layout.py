"""Names and folders of a dataset version (DESIGN.md, "Shards")."""

from __future__ import annotations

IMAGE_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
TAR_MEMBER_OVERHEAD = 512  # one ustar header per member; data is padded to 512 bytes
TAR_END = 10240  # two zero blocks, padded by tarfile to a whole 10 KiB record (upper bound)


def shard_files(layout: str, index: int) -> dict[str, str]:
    """Folder -> tar file name of shard `index` for a layout."""
    if layout == "paired":
        return {"image": f"image_{index:06d}.tar", "text_box": f"text_box_{index:06d}.tar"}
    return {"combined": f"shard_{index:06d}.tar"}


def folders(layout: str) -> list[str]:
    return list(shard_files(layout, 0))


def member_size(n_bytes: int) -> int:
    return TAR_MEMBER_OVERHEAD + -(-n_bytes // 512) * 512
