"""The tests' run-config factory (tests/helpers/config.py): the common base, per-test sections merged
in key by key, and a config the schema accepts."""

from __future__ import annotations

import pytest

from schemas.config import parse_config
from tests.helpers.config import deep_merge, run_config


def test_the_base_and_sections_merged_key_by_key(tmp_path):
    cfg = run_config(tmp_path, ingest={"partition_size": 2}, shards={"keep_empty": True})
    assert cfg == {"run": {"work_dir": str(tmp_path / "work")}, "sources": [{"uri": str(tmp_path / "img")}],
                   "shards": {"output": str(tmp_path / "ds"), "keep_empty": True}, "ingest": {"partition_size": 2}}
    parsed = parse_config(cfg)
    assert parsed.run.name == "localcap" and parsed.shards.keep_empty and parsed.ingest.partition_size == 2


def test_places_sources_and_name(tmp_path):
    urls = [{"type": "urls", "uri": str(tmp_path / "u.txt")}]
    cfg = run_config(tmp_path, urls, work="w", output=tmp_path / "elsewhere" / "ds", name="n")
    assert cfg["run"] == {"name": "n", "work_dir": str(tmp_path / "w")} and cfg["sources"] == urls
    assert cfg["sources"] is not urls and cfg["shards"] == {"output": str(tmp_path / "elsewhere" / "ds")}
    s3 = run_config(None, "s3://b/raw/", work="s3://b/work", output="s3://b/ds")
    assert (s3["run"]["work_dir"], s3["sources"], s3["shards"]["output"]) == ("s3://b/work", [{"uri": "s3://b/raw/"}], "s3://b/ds")
    with pytest.raises(ValueError, match="absolute"):
        run_config(None, "img")


def test_deep_merge_replaces_lists_and_scalars_and_copies():
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    out = deep_merge(base, {"a": {"c": [2]}}, {"a": {"e": {"f": 1}}, "d": None})
    assert out == {"a": {"b": 1, "c": [2], "e": {"f": 1}}, "d": None}
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1}
