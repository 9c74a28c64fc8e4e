"""Remote metadata is untrusted (issue 17, points 1 and 2): hostile versions on the local S3 server
(moto) are refused by `pull` before any byte is written, nothing lands outside the destination,
tars with link members are refused, malformed dataset.json / files.json / sizes.json name the file,
and the loader checks each shard it streamed against sizes.json (a tar pair cut short raises)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.partitions import write_table
from pipeline.inspection import describe_dataset
from pipeline.shards import open_dataset
from pipeline.shards.loader import ShardCountMismatch
from pipeline.shards.wids import write_wids_index
from pipeline.shards.metadata import (
    BadMetadata,
    check_path,
    parse_dataset_json,
    parse_files,
    parse_sizes,
    safe_destination,
)
from pipeline.shards.pull import pull
from pipeline.shards.writer import write_tar
from pipeline.storage import Storage, join, split_s3
from pipeline.versions import publish_version
from schemas.sample import TextBoxSample

# Datasets here are broken on purpose (and made by hand, without a build config).
pytestmark = pytest.mark.no_ps3_conformance


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (seed * 40 % 256, 90, 160)).save(out, "JPEG")
    return out.getvalue()


def make_dataset(root: Path, shards: int = 1, per_shard: int = 6, image_members=None) -> Path:
    """A paired dataset written with the real tar writer: dataset.json, sizes.json, manifest, wids."""
    (root / "image").mkdir(parents=True)
    (root / "text_box").mkdir()
    sizes, rows = {}, []
    for s in range(shards):
        keys = [f"{s:03d}{i:05d}" for i in range(per_shard)]
        members = [(f"{k}.jpg", _jpeg(i)) for i, k in enumerate(keys)]
        write_tar(str(root / "image" / f"image_{s:06d}.tar"), members)
        texts = [(f"{k}.json", TextBoxSample(text=["a red square"], box=[[1, 2, 30, 40]], global_text="a scene").to_json_bytes())
                 for k in keys]
        write_tar(str(root / "text_box" / f"text_box_{s:06d}.tar"), texts)
        sizes[f"{s:06d}.tar"] = per_shard
        rows += [{"key": k, "uid": k, "shard": f"image/image_{s:06d}.tar", "source": f"src/{k}.jpg", "width": 64, "height": 48, "boxes": 1}
                 for k in keys]
    for folder in ("image", "text_box"):
        (root / folder / "sizes.json").write_text(json.dumps({f"{folder}_{k}": v for k, v in sizes.items()}, indent=1))
    write_table(Storage(), str(root / "manifest.parquet"), pa.Table.from_pylist(rows))
    info = {"name": "hostile", "run_id": "t", "layout": "paired", "created_at": "2026-12-01T00:00:00Z",
            "counts": {"inputs": len(rows), "samples": len(rows), "rejected": 0, "rejected_by_reason": {}, "shards": shards},
            "statistics": {}}
    (root / "dataset.json").write_text(json.dumps(info, indent=1))
    write_wids_index(Storage(), str(root), "paired", "hostile")
    return root


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # what the CLI and Storage() read
    return Storage(endpoint_url=s3_endpoint)


@pytest.fixture
def published(s3, s3_bucket, tmp_path):
    """v1 of a good dataset on S3; (name, version uri)."""
    name = f"s3://{s3_bucket}/hostile-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]}"  # params share a bucket
    result = publish_version(s3, make_dataset(tmp_path / "built"), name, progress=False)
    return name, result.uri


def _put(s3: Storage, uri: str, data: bytes) -> None:
    bucket, key = split_s3(uri)
    s3.s3.put_object(Bucket=bucket, Key=key, Body=data)


def _rewrite_files_json(s3: Storage, version_uri: str, change) -> None:
    listing = json.loads(s3.read_bytes(join(version_uri, "files.json")))
    change(listing)
    _put(s3, join(version_uri, "files.json"), json.dumps(listing).encode())


def _assert_refused_before_writing(s3, name, tmp_path, *needles: str) -> None:
    """pull raises BadMetadata naming the file, writes nothing at all (dest not even created), and
    the CLI says it in one line with exit code 2."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    dest = work / "dest"
    before = _tree(tmp_path)
    with pytest.raises(BadMetadata) as err:
        pull(s3, name, dest, progress=False)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message
    assert not dest.exists()
    assert _tree(tmp_path) == before  # nothing appeared anywhere around the destination either

    from flows.cli import app

    out = CliRunner().invoke(app, ["pull", name, str(dest), "--no-progress"])
    assert out.exit_code == 2, out.output
    assert all(n in out.output for n in needles) and "Traceback" not in out.output
    assert not dest.exists() and _tree(tmp_path) == before


@pytest.mark.parametrize("hostile", [
    "../../escape.txt",
    "image/../../x.tar",
    "image/../../../escape.tar",
    "ABSOLUTE",
    "image//image_000009.tar",
    "./dataset.json",
    "image/./image_000009.tar",
    "notes.txt",
    "image/evil.sh",
    "image/sub/image_000009.tar",
    "image/image_000009.tar\\..\\..\\x",
    "text_box/image_000009.tar",
    "",
])
def test_hostile_paths_refuse_the_whole_pull_before_writing(published, s3, tmp_path, hostile):
    name, version = published
    if hostile == "ABSOLUTE":
        hostile = str(tmp_path / "abs-escape.txt")
    payload = b"pwned\n"
    _put(s3, join(version, hostile), payload)  # what a hostile publisher serves there; pull must not even ask
    _rewrite_files_json(s3, version, lambda listing: listing["files"].insert(
        0, {"path": hostile, "size": len(payload), "sha256": _sha(payload)}))
    _assert_refused_before_writing(s3, name, tmp_path, "files.json", repr(hostile))
    assert not (tmp_path / "abs-escape.txt").exists() and not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("entry, needle", [
    ({"size": "12"}, "not an integer"),
    ({"size": -1}, "negative"),
    ({"size": True}, "not an integer"),
    ({"size": 1.5}, "not an integer"),
    ({"sha256": "zz"}, "sha256"),
    ({"sha256": None}, "sha256"),
    ({"path": 7}, "not a non-empty string"),
])
def test_badly_typed_files_json_entries_are_refused(published, s3, tmp_path, entry, needle):
    name, version = published
    _rewrite_files_json(s3, version, lambda listing: listing["files"][0].update(entry))
    _assert_refused_before_writing(s3, name, tmp_path, "files.json", needle)


@pytest.mark.parametrize("raw", [b"not json {", b"[1, 2]", b'{"files": {"a": 1}}', b'{"files": [1]}'])
def test_malformed_files_json_is_refused(published, s3, tmp_path, raw):
    name, version = published
    _put(s3, join(version, "files.json"), raw)
    _assert_refused_before_writing(s3, name, tmp_path, "files.json")


def test_a_path_listed_twice_is_refused(published, s3, tmp_path):
    name, version = published
    _rewrite_files_json(s3, version, lambda listing: listing["files"].append(dict(listing["files"][0])))
    _assert_refused_before_writing(s3, name, tmp_path, "files.json", "twice")


def _publish_changed(s3, s3_bucket, tmp_path, change, name="changed") -> tuple[str, Path]:
    """Publish a good dataset, then break it with `change(root)` locally and serve the broken
    metadata files in the published version (honestly: files.json matches the bytes)."""
    root = make_dataset(tmp_path / f"built-{name}")
    uri = f"s3://{s3_bucket}/{name}"
    version = publish_version(s3, root, uri, progress=False).uri
    before = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    change(root)
    changed = {rel: (root / rel).read_bytes() for rel in before if (root / rel).read_bytes() != before[rel]}
    for rel, data in changed.items():  # a snapshot's tars lie in NAME/shards/, its metadata in NAME/vN/
        _put(s3, join(uri, "shards", rel) if rel.endswith(".tar") else join(version, rel), data)

    def relist(listing):
        for e in listing["files"]:
            if e["path"] in changed:
                e["size"], e["sha256"] = len(changed[e["path"]]), _sha(changed[e["path"]])
    _rewrite_files_json(s3, version, relist)
    return uri, root


def test_non_json_dataset_json(s3, s3_bucket, tmp_path):
    name, root = _publish_changed(s3, s3_bucket, tmp_path, lambda r: (r / "dataset.json").write_bytes(b"\x00not json"))
    _assert_refused_before_writing(s3, name, tmp_path, "dataset.json", "not JSON")
    with pytest.raises(BadMetadata, match=r"dataset\.json: not JSON"):
        open_dataset(name, storage=s3)
    with pytest.raises(BadMetadata, match=r"dataset\.json: not JSON"):
        open_dataset(str(root))
    with pytest.raises(BadMetadata, match=r"dataset\.json: not JSON"):
        describe_dataset(str(root))


@pytest.mark.parametrize("counts, needle", [
    ({"image_000000.tar": -5}, "negative"),
    ({"image_000000.tar": "6"}, "not an integer"),
    ({"image_000000.tar": 6.0}, "not an integer"),
    ({"image_000000.tar": None}, "not an integer"),
    ({"../../image_000000.tar": 6}, "not a tar name"),
    ([6], "not an object"),
])
def test_bad_sizes_json(s3, s3_bucket, tmp_path, counts, needle):
    name, root = _publish_changed(s3, s3_bucket, tmp_path, lambda r: (r / "image" / "sizes.json").write_text(json.dumps(counts)))
    _assert_refused_before_writing(s3, name, tmp_path, "image/sizes.json", needle)
    for uri, storage in ((name, s3), (str(root), None)):
        with pytest.raises(BadMetadata, match=needle):
            open_dataset(uri, storage=storage)
    with pytest.raises(BadMetadata, match=needle):
        describe_dataset(str(root))


def test_negative_dataset_counts(s3, s3_bucket, tmp_path):
    def negative(root: Path) -> None:
        info = json.loads((root / "dataset.json").read_text())
        info["counts"]["samples"] = -5
        (root / "dataset.json").write_text(json.dumps(info))

    name, root = _publish_changed(s3, s3_bucket, tmp_path, negative)
    _assert_refused_before_writing(s3, name, tmp_path, "dataset.json", "counts.samples is -5, a negative count")
    with pytest.raises(BadMetadata, match="negative"):
        open_dataset(str(root))


def test_sizes_json_naming_an_unlisted_tar_is_refused(s3, s3_bucket, tmp_path):
    def extra(root: Path) -> None:
        (root / "image" / "sizes.json").write_text(json.dumps({"image_000000.tar": 6, "image_000001.tar": 6}))

    name, _ = _publish_changed(s3, s3_bucket, tmp_path, extra)
    _assert_refused_before_writing(s3, name, tmp_path, "image/sizes.json", "image_000001.tar")


def _with_symlink_member(root: Path) -> None:
    """Both tars of shard 0: sample 1's member is a symlink to a file outside (a hostile tar)."""
    for tar_path in (root / "image" / "image_000000.tar", root / "text_box" / "text_box_000000.tar"):
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (m, data) in enumerate(members):
                if i == 1:
                    link = tarfile.TarInfo(m.name)
                    link.type, link.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
                    tar.addfile(link)
                else:
                    tar.addfile(m, io.BytesIO(data))


def test_tar_with_a_symlink_member_is_refused(s3, s3_bucket, tmp_path):
    name, root = _publish_changed(s3, s3_bucket, tmp_path, _with_symlink_member)
    dest = tmp_path / "work" / "dest"
    dest.parent.mkdir()
    outside = _tree(tmp_path)
    with pytest.raises(BadMetadata, match=r"_000000\.tar: tar member '00000001\.(jpg|json)' is a symlink -> \.\./") as err:
        pull(s3, name, dest, progress=False, workers=1)
    assert "\n" not in str(err.value)
    # Nothing took its final name (no dataset.json, no tar); only resumable .part files of good files.
    assert [p for p in _tree(dest) if (dest / p).is_file() and not p.endswith(".part")] == []
    assert not (dest / "image" / "image_000000.tar.part").exists() or not (dest / "text_box" / "text_box_000000.tar.part").exists()
    assert {p for p in _tree(tmp_path) if not p.startswith("work/dest")} == outside
    for uri, storage in ((name, s3), (str(root), None)):
        with pytest.raises(BadMetadata, match="symlink"):
            list(open_dataset(uri, storage=storage, decode=False))
    with pytest.raises(BadMetadata, match="symlink"):
        describe_dataset(str(root), n_samples=6)


def _cut_at_member(tar_path: Path, keep_members: int) -> None:
    """Truncate a tar's bytes where member `keep_members` starts (as a cut-short upload or copy would)."""
    with tarfile.open(tar_path) as tar:
        offset = tar.getmembers()[keep_members].offset
    with open(tar_path, "r+b") as f:
        f.truncate(offset)


def test_loader_raises_when_both_tars_are_cut_at_the_same_boundary(s3, s3_bucket, tmp_path):
    def cut(root: Path) -> None:  # 6 samples declared, both tars cut after sample 3
        _cut_at_member(root / "image" / "image_000000.tar", 3)
        _cut_at_member(root / "text_box" / "text_box_000000.tar", 3)

    name, root = _publish_changed(s3, s3_bucket, tmp_path, cut)
    for uri, storage in ((name, s3), (str(root), None)):
        ds = open_dataset(uri, storage=storage, decode=False)
        assert len(ds) == 6
        streamed = []
        with pytest.raises(ShardCountMismatch, match=r"image_000000\.tar: streamed 3 samples, image/sizes\.json declares 6"):
            for sample in ds:
                streamed.append(sample["key"])
        assert len(streamed) == 3
        # warn: the samples there, and a warning naming the shard.
        with pytest.warns(RuntimeWarning, match="streamed 3 samples"):
            got = list(open_dataset(uri, storage=storage, decode=False, on_count_mismatch="warn"))
        assert [s["key"] for s in got] == streamed
    with pytest.raises(ValueError, match="on_count_mismatch"):
        open_dataset(str(root), on_count_mismatch="ignore")


def test_loader_raises_on_more_samples_than_declared(tmp_path):
    root = make_dataset(tmp_path / "ds", shards=2, per_shard=3)
    for folder in ("image", "text_box"):
        (root / folder / "sizes.json").write_text(json.dumps({f"{folder}_000000.tar": 3, f"{folder}_000001.tar": 2}))
    with pytest.raises(ShardCountMismatch, match=r"image_000001\.tar: streamed 3 samples, image/sizes\.json declares 2"):
        list(open_dataset(str(root), decode=False))
    assert len(list(open_dataset(str(root), decode=False, shards=range(1)))) == 3  # the honest shard alone


def test_good_version_still_pulls_and_streams(published, s3, tmp_path):
    name, _ = published
    dest = tmp_path / "dest"
    result = pull(s3, name, dest, progress=False)
    built = tmp_path / "built"
    # The shards and sizes as built; the metadata the snapshot's (dataset.json, manifest, hashes).
    tars = [p for p in _tree(built) if p.endswith((".tar", "sizes.json"))]
    assert {p: (built / p).read_bytes() for p in tars} == {p: (dest / p).read_bytes() for p in tars}
    assert (dest / "dataset.json").read_bytes() == s3.read_bytes(join(result.version_uri, "dataset.json"))
    listed = json.loads(s3.read_bytes(join(result.version_uri, "files.json")))["files"]
    assert result.downloaded == len(listed) - 2 and {e["path"] for e in listed} <= set(_tree(dest))  # wids indexes: written for the copy
    assert pull(s3, name, dest, progress=False).downloaded == 0
    assert len(list(open_dataset(str(dest), decode=False))) == 6
    assert "samples   6 in 1 shards" in describe_dataset(str(dest))


def test_a_symlinked_folder_leading_out_of_the_destination_is_refused(published, s3, tmp_path):
    name, _ = published
    dest, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, dest / "image")
    with pytest.raises(BadMetadata, match="resolves outside"):
        pull(s3, name, dest, progress=False)
    assert list(elsewhere.iterdir()) == []


def test_metadata_functions():
    for ok in ("dataset.json", "files.json", "manifest.parquet", "rejects.parquet", "wids.json", "wids-image.json",
               "wids-text_box.json", "image/sizes.json", "text_box/text_box_000012.tar", "image/image_1000000.tar",
               "combined/shard_000000.tar", "combined/sizes.json"):
        assert check_path(ok) == ok
    for bad in ("/etc/passwd", "C:/x", "image/", "image", "image/image_00001.tar", "combined/image_000000.tar",
                "image/sizes.json/x", "Dataset.json", "image\\image_000000.tar"):
        with pytest.raises(BadMetadata):
            check_path(bad)
    assert safe_destination(Path("/d"), "image/sizes.json") == Path("/d/image/sizes.json")
    assert parse_sizes(b'{"image_000000.tar": 0}', "x/image/sizes.json") == {"image_000000.tar": 0}
    with pytest.raises(BadMetadata, match=r"^x/text_box/sizes\.json: 'image_000000\.tar' is not a tar name"):
        parse_sizes(b'{"image_000000.tar": 1}', "x/text_box/sizes.json")
    with pytest.raises(BadMetadata, match="layout"):
        parse_dataset_json(b'{"layout": "../x", "counts": {"samples": 1, "shards": 1}}', "d.json")
    with pytest.raises(BadMetadata, match="counts.shards is missing"):
        parse_dataset_json(b'{"layout": "paired", "counts": {"samples": 1}}', "d.json")
    with pytest.raises(BadMetadata, match="rejected_by_reason.too_small"):
        parse_dataset_json(b'{"layout": "paired", "counts": {"samples": 1, "shards": 1, "rejected_by_reason": {"too_small": -1}}}', "d")
    assert parse_files(json.dumps({"files": [{"path": "dataset.json", "size": 3, "sha256": "a" * 64}]}), "f") == \
        [{"path": "dataset.json", "size": 3, "sha256": "a" * 64}]
    assert isinstance(BadMetadata("x"), ValueError)
