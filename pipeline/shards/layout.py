"""Names and folders of a dataset version (docs/design.md, "Shards"): the one module that spells
the tar, sizes.json and wids index names."""

from __future__ import annotations

import re

IMAGE_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> the image member's extension
IMAGE_EXTS = tuple(IMAGE_EXT.values())  # the extensions an image member may have, in the order readers try them
TAR_MEMBER_OVERHEAD = 512  # one ustar header per member; data is padded to 512 bytes
TAR_END = 10240  # two zero blocks, padded by tarfile to a whole 10 KiB record (upper bound)
LAYOUT_FOLDERS = {"paired": ("image", "text_box"), "combined": ("combined",)}
TAR_STEM = {"image": "image", "text_box": "text_box", "combined": "shard"}  # folder -> its tars' stem
TAR_SUFFIX = ".tar"
SIZES = "sizes.json"  # in each folder: tar file name -> number of samples
WIDS_COMBINED = "wids.json"
WIDS_INDEXES = tuple(f"wids-{f}.json" for f in LAYOUT_FOLDERS["paired"]) + (WIDS_COMBINED,)  # every name wids_index_name gives


def shard_files(layout: str, index: int) -> dict[str, str]:
    """Folder -> tar file name of shard `index` for a layout."""
    return {folder: f"{TAR_STEM[folder]}_{index:06d}{TAR_SUFFIX}" for folder in LAYOUT_FOLDERS[layout]}


def text_box_tar(image_tar: str) -> str:
    """The text_box tar paired with an image tar, as a tar name (image_000003.tar ->
    text_box_000003.tar) or a path relative to the dataset (image/image_000003.tar ->
    text_box/text_box_000003.tar). Anything else (a combined tar) is returned unchanged."""
    folder, sep, name = image_tar.rpartition("/")
    stem = f"{TAR_STEM['image']}_"
    if not name.startswith(stem) or (sep and folder != "image"):
        return image_tar
    paired = f"{TAR_STEM['text_box']}_{name[len(stem):]}"
    return f"text_box/{paired}" if sep else paired


def wids_index_name(layout: str, folder: str) -> str:
    """The wids shard index of a folder: wids.json (combined) or wids-FOLDER.json (paired)."""
    return WIDS_COMBINED if layout == "combined" else f"wids-{folder}.json"


def tar_name_pattern(folder: str) -> re.Pattern:
    """What a tar of `folder` is called (shard_files), for names read from elsewhere."""
    return re.compile(rf"{re.escape(TAR_STEM[folder])}_\d{{6,}}{re.escape(TAR_SUFFIX)}")


def folders(layout: str) -> list[str]:
    return list(LAYOUT_FOLDERS[layout])


def member_size(n_bytes: int) -> int:
    return TAR_MEMBER_OVERHEAD + -(-n_bytes // 512) * 512
