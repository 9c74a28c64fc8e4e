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
