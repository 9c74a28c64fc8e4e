"""Storage against real local paths and a real S3 API (moto's server on 127.0.0.1); no mocks, no Ray."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import partitions
from pipeline.storage import Storage, join, split_s3

# A small tree with images, a text file, hidden files and a hidden folder.
TREE = {
    "a.jpg": b"a" * 10,
    "b.JPG": b"b" * 20,
    "notes.txt": b"text",
    "sub/c.jpg": b"c" * 30,
    "sub/deeper/d.png": b"d" * 40,
    ".hidden.jpg": b"h",
    ".cache/e.jpg": b"e",
    "sub/.f.jpg": b"f",
}
VISIBLE = ["a.jpg", "b.JPG", "notes.txt", "sub/c.jpg", "sub/deeper/d.png"]


def _tree(root: Path) -> None:
    for name, data in TREE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _upload_tree(storage: Storage, base: str) -> None:
    for name, data in TREE.items():
        storage.write_bytes(join(base, name), data)


def _rel(entries, base: str) -> list[str]:
    base = base.rstrip("/") + "/"
    return [e.uri[len(base):] if e.uri.startswith(base) else e.uri for e in entries]


@pytest.fixture
def s3(s3_endpoint) -> Storage:
    return Storage(endpoint_url=s3_endpoint)


# -- local ---------------------------------------------------------------------------------------
def test_local_roundtrip_exists_size_delete(tmp_path):
    st = Storage()
    uri = str(tmp_path / "new" / "folder" / "x.bin")
    assert not st.exists(uri)
    st.write_bytes(uri, b"hello world")  # parent folders are created
    assert st.exists(uri)
    assert st.read_bytes(uri) == b"hello world"
    assert st.size(uri) == 11
    st.write_bytes(uri, b"second")  # overwrite is whole
    assert st.read_bytes(uri) == b"second"
    assert sorted(os.listdir(tmp_path / "new" / "folder")) == ["x.bin"]  # no temp files left behind
    st.delete(uri)
    assert not st.exists(uri)
    st.delete(uri)  # deleting a missing file is not an error


def test_local_list_folder_skips_hidden_and_sorts(tmp_path):
    _tree(tmp_path)
    entries = Storage().list_files(str(tmp_path))
    assert _rel(entries, str(tmp_path)) == VISIBLE
    sizes = {name: e.size for name, e in zip(_rel(entries, str(tmp_path)), entries)}
    assert sizes["sub/c.jpg"] == 30 and sizes["sub/deeper/d.png"] == 40
    assert all(e.version for e in entries)  # mtime: a changed file gets a new fingerprint


def test_local_list_glob(tmp_path):
    _tree(tmp_path)
    st = Storage()
    assert _rel(st.list_files(str(tmp_path / "**" / "*.jpg")), str(tmp_path)) == ["a.jpg", "sub/c.jpg"]
    assert _rel(st.list_files(str(tmp_path / "*.jpg")), str(tmp_path)) == ["a.jpg"]
    assert _rel(st.list_files(str(tmp_path / "sub" / "*")), str(tmp_path)) == ["sub/c.jpg"]


def test_local_list_extensions_filter(tmp_path):
    _tree(tmp_path)
    st = Storage()
    # case-insensitive, with or without the dot
    assert _rel(st.list_files(str(tmp_path), [".jpg"]), str(tmp_path)) == ["a.jpg", "b.JPG", "sub/c.jpg"]
    assert _rel(st.list_files(str(tmp_path), ["PNG", "txt"]), str(tmp_path)) == ["notes.txt", "sub/deeper/d.png"]


def test_local_list_single_file_and_missing(tmp_path):
    _tree(tmp_path)
    st = Storage()
    assert _rel(st.list_files(str(tmp_path / "a.jpg")), str(tmp_path)) == ["a.jpg"]
    with pytest.raises(FileNotFoundError):
        st.list_files(str(tmp_path / "nope"))


def test_local_list_under_a_hidden_parent_folder(tmp_path):
    """Only names below the listed folder count as hidden: a source at ~/.cache/images still lists."""
    root = tmp_path / ".cache" / "images"
    _tree(root)
    st = Storage()
    assert _rel(st.list_files(str(root)), str(root)) == VISIBLE
    assert _rel(st.list_files(str(root / "**" / "*.jpg")), str(root)) == ["a.jpg", "sub/c.jpg"]


def test_local_list_prefix(tmp_path):
    _tree(tmp_path)
    st = Storage()
    assert st.list_prefix(str(tmp_path)) == [".hidden.jpg", "a.jpg", "b.JPG", "notes.txt"]  # files only, no recursion
    assert st.list_prefix(str(tmp_path / "sub")) == [".f.jpg", "c.jpg"]
    assert st.list_prefix(str(tmp_path / "absent")) == []


def test_local_atomic_path_success_and_failure(tmp_path):
    st = Storage()
    target = tmp_path / "out" / "file.bin"
    with st.atomic_path(str(target)) as tmp:
        Path(tmp).write_bytes(b"partial")
        assert not target.exists()  # nothing at the target until the block ends
    assert target.read_bytes() == b"partial"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)

    failed = tmp_path / "out" / "failed.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with st.atomic_path(str(failed)) as tmp:
            Path(tmp).write_bytes(b"half written")
            raise RuntimeError("boom")
    assert not failed.exists()
    assert sorted(os.listdir(tmp_path / "out")) == ["file.bin"]  # no temp file left

    # a failed rewrite leaves the old content in place
    with pytest.raises(RuntimeError):
        with st.atomic_path(str(target)) as tmp:
            Path(tmp).write_bytes(b"new")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"partial"


# -- S3 ------------------------------------------------------------------------------------------
def test_s3_roundtrip_exists_size_delete(s3, s3_bucket):
    uri = f"s3://{s3_bucket}/some/key.bin"
    assert not s3.exists(uri)
    s3.write_bytes(uri, b"hello s3")
    assert s3.exists(uri)
    assert s3.read_bytes(uri) == b"hello s3"
    assert s3.size(uri) == 8
    s3.write_bytes(uri, b"overwritten")
    assert s3.read_bytes(uri) == b"overwritten"
    s3.delete(uri)
    assert not s3.exists(uri)


def test_s3_list_prefix_and_glob(s3, s3_bucket):
    base = f"s3://{s3_bucket}/raw"
    _upload_tree(s3, base)
    s3.write_bytes(f"s3://{s3_bucket}/other/z.jpg", b"z")
    for prefix in (base, base + "/"):
        entries = s3.list_files(prefix)
        assert _rel(entries, base) == VISIBLE
    sizes = {name: e.size for name, e in zip(_rel(s3.list_files(base + "/"), base), s3.list_files(base + "/"))}
    assert sizes == {"a.jpg": 10, "b.JPG": 20, "notes.txt": 4, "sub/c.jpg": 30, "sub/deeper/d.png": 40}
    assert all(e.version for e in s3.list_files(base + "/"))  # the ETag
    # Globs mean what they mean locally: `**/` is zero or more folders, `*` stays within one.
    assert _rel(s3.list_files(base + "/**/*.jpg"), base) == ["a.jpg", "sub/c.jpg"]
    assert _rel(s3.list_files(base + "/*.jpg"), base) == ["a.jpg"]
    assert _rel(s3.list_files(base + "/sub/*"), base) == ["sub/c.jpg"]
    assert _rel(s3.list_files(base + "/**"), base) == VISIBLE
    assert _rel(s3.list_files(f"s3://{s3_bucket}/*/*.jpg"), f"s3://{s3_bucket}") == ["other/z.jpg", "raw/a.jpg"]
    assert s3.list_files(f"s3://{s3_bucket}/absent/") == []
    # A prefix is a folder: `raw` does not reach into `raw2/`; a prefix naming one object lists it.
    s3.write_bytes(f"s3://{s3_bucket}/raw2/x.jpg", b"x")
    assert _rel(s3.list_files(base), base) == VISIBLE
    assert [e.uri for e in s3.list_files(base + "/a.jpg")] == [base + "/a.jpg"]


def test_s3_list_extensions_filter(s3, s3_bucket):
    base = f"s3://{s3_bucket}/raw/"
    _upload_tree(s3, base)
    assert _rel(s3.list_files(base, [".jpg"]), base) == ["a.jpg", "b.JPG", "sub/c.jpg"]
    assert _rel(s3.list_files(base, ["png"]), base) == ["sub/deeper/d.png"]


def test_s3_list_under_a_hidden_parent_prefix(s3, s3_bucket):
    base = f"s3://{s3_bucket}/.staging/raw"
    _upload_tree(s3, base)
    assert _rel(s3.list_files(base + "/"), base) == VISIBLE
    assert _rel(s3.list_files(base + "/**/*.jpg"), base) == ["a.jpg", "sub/c.jpg"]
    # a glob that cuts inside a name: `im*` must not make `im.jpg` look hidden
    s3.write_bytes(f"s3://{s3_bucket}/pics/im.jpg", b"1")
    s3.write_bytes(f"s3://{s3_bucket}/pics/image.jpg", b"2")
    assert _rel(s3.list_files(f"s3://{s3_bucket}/pics/im*"), f"s3://{s3_bucket}/pics") == ["im.jpg", "image.jpg"]


def test_s3_list_prefix(s3, s3_bucket):
    base = f"s3://{s3_bucket}/raw"
    _upload_tree(s3, base)
    assert s3.list_prefix(base) == [".hidden.jpg", "a.jpg", "b.JPG", "notes.txt"]
    assert s3.list_prefix(base + "/") == [".hidden.jpg", "a.jpg", "b.JPG", "notes.txt"]
    assert s3.list_prefix(base + "/sub") == [".f.jpg", "c.jpg"]
    assert s3.list_prefix(f"s3://{s3_bucket}/absent") == []
    s3.write_bytes(f"s3://{s3_bucket}/top.json", b"{}")
    assert s3.list_prefix(f"s3://{s3_bucket}") == ["top.json"]
    assert s3.list_prefix(f"s3://{s3_bucket}/") == ["top.json"]


def test_s3_atomic_path(s3, s3_bucket):
    uri = f"s3://{s3_bucket}/out/file.bin"
    with s3.atomic_path(uri) as tmp:
        Path(tmp).write_bytes(b"x" * 1000)
        assert not s3.exists(uri)  # the object appears only after the block
    assert s3.read_bytes(uri) == b"x" * 1000
    assert not os.path.exists(tmp)  # the local temp file is gone

    failed = f"s3://{s3_bucket}/out/failed.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with s3.atomic_path(failed) as tmp:
            Path(tmp).write_bytes(b"half")
            raise RuntimeError("boom")
    assert not s3.exists(failed)
    assert not os.path.exists(tmp)
    assert s3.list_prefix(f"s3://{s3_bucket}/out") == ["file.bin"]


def test_s3_multipart_atomic_path(s3, s3_bucket):
    """Big enough for boto3's managed upload to go multipart (threshold 8 MiB)."""
    uri = f"s3://{s3_bucket}/big.bin"
    data = os.urandom(9 * 2**20)
    with s3.atomic_path(uri) as tmp:
        Path(tmp).write_bytes(data)
    assert s3.size(uri) == len(data)
    assert s3.read_bytes(uri) == data


def test_storage_honours_aws_endpoint_url(s3_endpoint, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    st = Storage()
    uri = f"s3://{s3_bucket}/env.txt"
    st.write_bytes(uri, b"via env")
    assert st.read_bytes(uri) == b"via env"
    # and it really went to the local server
    assert Storage(endpoint_url=s3_endpoint).read_bytes(uri) == b"via env"


def test_storage_pickles_after_client_created(s3, s3_bucket):
    uri = f"s3://{s3_bucket}/p.txt"
    s3.write_bytes(uri, b"pickled")  # the client exists now
    assert s3._client is not None
    clone = pickle.loads(pickle.dumps(s3))
    assert clone.endpoint_url == s3.endpoint_url and clone.region == s3.region
    assert clone._client is None
    assert clone.read_bytes(uri) == b"pickled"


def test_join_and_split():
    assert join("s3://b/work/", "run", "/ingest/") == "s3://b/work/run/ingest"
    assert join("/tmp/w", "run", "ingest") == "/tmp/w/run/ingest"
    assert split_s3("s3://bucket/a/b.txt") == ("bucket", "a/b.txt")
    with pytest.raises(ValueError):
        split_s3("/local/path")


# -- partitions on S3 ----------------------------------------------------------------------------
def test_partitions_on_s3(s3, s3_bucket):
    table = pa.table({"uid": ["a", "b", "c"], "n": [1, 2, 3], "blob": [b"x" * 100_000, b"y", b"z"]})
    uri = f"s3://{s3_bucket}/work/run/ingest/{partitions.part_name(0)}"
    partitions.write_table(s3, uri, table, "fp-123")
    assert partitions.read_fingerprint(s3, uri) == "fp-123"
    back = partitions.read_table(s3, uri)
    assert back.equals(table)
    assert partitions.read_table(s3, uri, columns=["n"])["n"].to_pylist() == [1, 2, 3]

    ingest = f"s3://{s3_bucket}/work/run/ingest"
    assert partitions.read_fingerprint(s3, f"{ingest}/{partitions.part_name(9)}") is None
    partitions.write_table(s3, f"{ingest}/{partitions.part_name(1)}", table)  # no fingerprint
    assert partitions.read_fingerprint(s3, f"{ingest}/{partitions.part_name(1)}") is None
    s3.write_bytes(f"{ingest}/{partitions.part_name(2)}", b"not parquet at all")
    assert partitions.read_fingerprint(s3, f"{ingest}/{partitions.part_name(2)}") is None

    s3.delete(f"{ingest}/{partitions.part_name(2)}")
    both = partitions.read_tables(s3, f"s3://{s3_bucket}/work/run/ingest", "part", table.schema, columns=["uid"])
    assert both["uid"].to_pylist() == ["a", "b", "c", "a", "b", "c"]
    empty = partitions.read_tables(s3, f"s3://{s3_bucket}/work/run/absent", "part", table.schema)
    assert empty.num_rows == 0 and empty.schema.names == table.schema.names


def test_partitions_local_fingerprint(tmp_path):
    st = Storage()
    table = pa.table({"x": [1, 2]})
    uri = str(tmp_path / "stage" / partitions.part_name(3))
    partitions.write_table(st, uri, table, "abc")
    assert partitions.read_fingerprint(st, uri) == "abc"
    assert partitions.read_fingerprint(st, str(tmp_path / "stage" / "missing.parquet")) is None
    assert partitions.read_table(st, uri).equals(table)
