"""URL lists in every supported format, gzipped or not, streamed with their meta columns."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.ingest.url_lists import UrlRow, iter_url_rows, list_format

ROWS = [{"url": f"http://example.test/{i}.jpg", "caption": f"photo {i}", "license": "cc-by"} for i in range(5)]
EXPECTED = [UrlRow(r["url"], {"caption": r["caption"], "license": "cc-by"}) for r in ROWS]


def _encode(fmt: str) -> bytes:
    if fmt == "parquet":
        out = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(ROWS), out, row_group_size=2)
        return out.getvalue()
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        return ("url" + sep + "caption" + sep + "license\n" + "".join(
            sep.join([r["url"], r["caption"], r["license"]]) + "\n" for r in ROWS)).encode()
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    return ("# a comment\n" + "".join(r["url"] + "\n" for r in ROWS) + "\n").encode()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "txt"])
@pytest.mark.parametrize("gz", [False, True])
def test_every_format(fmt, gz):
    data = _encode(fmt)
    if gz:
        data = gzip.compress(data)
    name = f"list.{fmt}" + (".gz" if gz else "")
    rows = list(iter_url_rows(io.BytesIO(data), name, batch_rows=2))
    if fmt == "txt":
        assert rows == [UrlRow(r.url) for r in EXPECTED]
    else:
        assert rows == EXPECTED


def test_streaming_reads_lazily():
    rows = iter_url_rows(io.BytesIO("".join(f"http://h/{i}\n" for i in range(1_000_000)).encode()), "big.txt")
    assert next(rows).url == "http://h/0" and next(rows).url == "http://h/1"


def test_bad_names_and_columns():
    with pytest.raises(ValueError, match="must end in"):
        list_format("urls.xlsx")
    with pytest.raises(ValueError, match="no URL column"):
        list(iter_url_rows(io.BytesIO(b"link,caption\nhttp://x,y\n"), "l.csv"))
    assert list(iter_url_rows(io.BytesIO(b"link,caption\nhttp://x,y\n"), "l.csv", url_column="link")) == [UrlRow("http://x", {"caption": "y"})]


def test_a_url_named_twice_is_one_input(tmp_path):
    """Twice in a list, or in a list and a crawl: one urls row (two would share uid and source, and
    the dedupe stage's drop of one would drop both)."""
    from pipeline.ingest.reader import UrlPartitionWriter
    from pipeline.partitions import read_tables
    from pipeline.storage import Storage
    from schemas.tables import URLS

    writer = UrlPartitionWriter(Storage(), str(tmp_path), size=2)
    for url in ("http://a.test/1.jpg", "http://a.test/2.jpg", "http://a.test/1.jpg", "http://a.test/3.jpg", "http://a.test/2.jpg"):
        writer.add({"url": url, "meta": "{}", "skip_reason": None, "skip_detail": None})
    writer.flush()
    rows = read_tables(Storage(), str(tmp_path), "part", URLS).to_pylist()
    assert [r["url"] for r in rows] == ["http://a.test/1.jpg", "http://a.test/2.jpg", "http://a.test/3.jpg"]
    assert writer.total == 3 and len(writer.fingerprints) == 2
