"""What a dataset is, on disk and in a bucket: the one module that spells its names (docs/design.md,
"Shards", and docs/architecture.md, "Versions"). The shard writer, publish, pull and every reader
import their names from here.

A dataset folder (a build's shards.output, a pulled version) holds:

    image/image_NNNNNN.tar, text_box/text_box_NNNNNN.tar   the shards (or combined/shard_NNNNNN.tar)
    FOLDER/sizes.json      tar name -> samples
    manifest.parquet       one row per sample: key, uid, shard (the image/combined tar's path), source, ...
    hashes.parquet         the samples' perceptual hashes (what the next build deduplicates against)
    rejects.parquet        the build's rejected inputs, with reasons
    wids-FOLDER.json       webdataset wids indexes (wids.json for the combined layout)
    dataset.json           written last: a folder holding it is whole

A published dataset NAME (s3:// or a local folder) holds versions, each a snapshot of the whole
dataset, that share one store of immutable shards:

    NAME/shards/FOLDER/STEM_NNNNNN.tar   every shard any version holds; N unique across the dataset
    NAME/vN/                             the snapshot's metadata: the files above (no tars), plus
    NAME/vN/files.json                   every file's path in the snapshot, size, sha256, S3 ETag
    NAME/vN/report.html                  the HTML report of the build that made vN, one self-contained
                                         page (written after the commit, so not in files.json; gc
                                         deletes it with the version)
    NAME/_claims/vN.json                 who took the number N (create-if-absent: the commit point)
    NAME/_staged/ID/                     a snapshot's metadata before its number is taken
    NAME/_blocked/*.parquet              hashes of removed samples never to be ingested again
    NAME/_next_shard                     the next free shard number (a compare-and-swap counter)
    NAME/LATEST                          "vN", moved forward after vN/dataset.json
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

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


# -- a dataset folder's files --------------------------------------------------------------------
DATASET = "dataset.json"
MANIFEST_FILE = "manifest.parquet"
HASHES_FILE = "hashes.parquet"
REJECTS_FILE = "rejects.parquet"
# What describes the tars, written after them and before dataset.json.
DESCRIPTORS = (SIZES, MANIFEST_FILE, HASHES_FILE, *WIDS_INDEXES)

# -- a published dataset's files -------------------------------------------------------------------
FILES = "files.json"
REPORT_PAGE = "report.html"
LATEST = "LATEST"
CLAIMS = "_claims"
STAGED = "_staged"
BLOCKED = "_blocked"
NEXT_SHARD = "_next_shard"
SHARD_STORE = "shards"
SNAPSHOT_FORMAT = 2  # files.json "format": 2 = tars in NAME/shards/ (1, or absent: tars in the version folder)


def version_name(n: int) -> str:
    return f"v{n}"


def version_number(name: str) -> int | None:
    name = name.rstrip("/").removesuffix(".json")
    return int(name[1:]) if name[:1] == "v" and name[1:].isdigit() else None


def shard_index(tar: str) -> int:
    """The number of a tar name or path (image/image_000012.tar -> 12)."""
    return int(tar.rsplit("_", 1)[1].split(".")[0])


def renumbered(path: str, index: int) -> str:
    """A tar path with another shard number (image/image_000003.tar, 12 -> image/image_000012.tar)."""
    folder, _, name = path.rpartition("/")
    stem = name.rsplit("_", 1)[0]
    return f"{folder}/{stem}_{index:06d}{TAR_SUFFIX}" if folder else f"{stem}_{index:06d}{TAR_SUFFIX}"


def brace_list(urls: list[str]) -> str:
    """webdataset's URL list for PS3's loader: runs of consecutive shard numbers as brace patterns,
    joined with '::' (webdataset's expand_urls splits on '::', then brace-expands each part)."""
    parts, run = [], []

    def close() -> None:
        if len(run) == 1:
            parts.append(run[0][1])
        elif run:
            head, _, _ = run[0][1].rpartition("_")
            parts.append(f"{head}_{{{run[0][0]:06d}..{run[-1][0]:06d}}}{TAR_SUFFIX}")

    for url in urls:
        n, head = shard_index(url), url.rpartition("_")[0]
        if run and (n != run[-1][0] + 1 or head != run[-1][1].rpartition("_")[0]):
            close()
            run = []
        run.append((n, url))
    close()
    return "::".join(parts)


def tar_sample_counts(manifest: pa.Table, layout: str) -> dict[str, dict[str, int]]:
    """sizes.json contents per folder: tar file name -> number of samples."""
    out: dict[str, dict[str, int]] = {f: {} for f in folders(layout)}
    if manifest.num_rows == 0:
        return out
    counts = pc.value_counts(manifest["shard"]).to_pylist()
    for item in sorted(counts, key=lambda c: c["values"]):
        index = int(item["values"].rsplit("_", 1)[1].split(".")[0])
        for folder, name in shard_files(layout, index).items():
            out[folder][name] = item["counts"]
    return out
