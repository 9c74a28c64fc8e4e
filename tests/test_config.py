"""A bad config fails before any work, naming the offending field."""

from __future__ import annotations

import pytest

from schemas.config import apply_overrides, ConfigError, load_config, parse_config

MINIMAL = {"sources": [{"uri": "images/"}], "shards": {"output": "out/"}}


def test_minimal_config_gets_defaults():
    cfg = parse_config(MINIMAL)
    assert cfg.ingest.min_side == 1024
    assert cfg.shards.layout == "paired"
    assert cfg.sources[0].type == "files"


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"ingest": {"min_side": 0}}, "ingest.min_side"),
        ({"ingest": {"min_sid": 10}}, "ingest.min_sid"),
        ({"shards": {"output": "o", "layout": "tarball"}}, "shards.layout"),
        ({"sources": []}, "sources"),
        ({"sources": [{"path": "x"}]}, "sources.0.uri"),
        ({"ingest": {"formats": ["JPEG", "HEIC"]}}, "ingest.formats.1"),
        ({"regions": {"method": "ps3"}}, "regions.method"),
        ({"regions": {"masks": "slic"}}, "regions.masks"),
        ({"regions": {"tiles": {"scales": []}}}, "regions.tiles.scales"),
        ({"captioner": {"backend": "llamacpp"}}, "captioner.backend"),
        ({"captioner": {"backend": "vllm"}}, "captioner"),
        ({"captioner": {"backend": "openai", "model": "m", "openai": {"concurrency": 0}}}, "captioner.openai.concurrency"),
        ({"captioner": {"backend": "vllm", "model": "m", "vllm": {"tensor_parallel": 2}}}, "captioner.vllm.tensor_parallel"),
        ({"bogus_section": {}}, "bogus_section"),
    ],
)
def test_bad_config_names_field(patch, field):
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, **patch})
    assert f" {field}:" in str(err.value)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 or (len(lines) == 3 and field == "sources.0.uri")  # one line a mistake (that patch makes two)


def test_set_indexes_lists_and_refuses_to_append():
    data = {"sources": [{"uri": "a"}, {"uri": "b"}], "shards": {"output": "o"}}
    assert apply_overrides(data, {"sources.1.uri": "/x"})["sources"] == [{"uri": "a"}, {"uri": "/x"}]
    for key, says in [("sources.2.uri", "cannot add one"), ("sources.first", "index it with a number"),
                      ("shards.output.deep", "is a value"), ("shards..x", "empty key")]:
        with pytest.raises(ConfigError, match=says):
            apply_overrides(data, {key: 1})


def test_missing_shards_output():
    with pytest.raises(ConfigError, match="shards"):
        parse_config({"sources": [{"uri": "x"}]})


def test_load_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sources:\n  - uri: imgs\nshards:\n  output: out\n")
    cfg = load_config(path, {"ingest.min_side": 512, "shards.layout": "combined"})
    assert cfg.ingest.min_side == 512 and cfg.shards.layout == "combined"


def test_load_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_shipped_configs_are_valid():
    from pathlib import Path

    import yaml

    from schemas.sweep import load_sweep_config
    from schemas.train import TrainConfig

    root = Path(__file__).resolve().parents[1]
    for path in list((root / "configs").glob("*.yaml")) + [root / "flows" / "demo.yaml", root / "flows" / "sweep-demo.yaml"]:
        if path.name == "train.yaml":  # a train config of its own (`localcap train --config`)
            TrainConfig.model_validate(yaml.safe_load(path.read_text()))
        elif path.name.startswith("sweep"):  # sweep configs (`localcap sweep CONFIG`)
            load_sweep_config(path)
        else:
            load_config(path)
