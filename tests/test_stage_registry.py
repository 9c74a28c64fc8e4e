"""The stage model (pipeline/stage.py): a stage added in one file with its own config section runs
in the real flow, resumes and shows in `status`; code fingerprints follow imports; the config is
checked once per run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import code
from pipeline.partitions import part_name, read_table, read_tables
from pipeline.stage import Partition, Stage, StageResult, registered, stages_for
from pipeline.status import format_status, run_status
from pipeline.storage import Storage, join
from schemas.base import Section
from schemas.config import ConfigError, parse_config
from tests.helpers.config import deep_merge, run_config
from tests.helpers.images import scene_jpeg

PIXELS = pa.schema([("uid", pa.string()), ("megapixels", pa.float64()), ("large", pa.bool_())])


class PixelsSection(Section):
    large_mp: float = 3.0  # an image of at least this many megapixels counts as large


class PixelCountStage(Stage):
    """The example of docs/architecture.md: megapixels per kept image, from the ingest table."""

    name = "pixels"
    needs = ("ingest",)
    outputs = {"part": PIXELS}
    marker = "images"
    section = PixelsSection

    def partitions(self, inputs: dict[str, StageResult]) -> list[Partition]:
        return [Partition([self.options.model_dump(), fp], join(self.ctx.stage_dir("ingest"), part_name(i)))
                for i, fp in enumerate(inputs["ingest"].fingerprints)]

    def process(self, images_uri: str) -> dict[str, pa.Table]:
        t = read_table(self.storage, images_uri, columns=["uid", "width", "height"])
        mp = [w * h / 1e6 for w, h in zip(t["width"].to_pylist(), t["height"].to_pylist())]
        return {"part": pa.table({"uid": t["uid"], "megapixels": mp, "large": [m >= self.options.large_mp for m in mp]},
                                 schema=PIXELS)}


def _images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i}.jpg").write_bytes(scene_jpeg(700 + i, 1600 + 1000 * i, 1200))
    return folder


def _computed(dataset: dict) -> dict[str, int]:
    return {s["stage"]: s["computed"] for s in dataset["builds"][-1]["stages"]}


def test_the_registry_orders_stages_by_what_they_need():
    names = [cls.name for cls in registered()]
    assert names.index("ingest") < names.index("pixels") and names.index("ingest") < names.index("dedupe")
    assert names[-1] == "shard" and names.index("regions") < names.index("caption") < names.index("shard")
    # An added stage is part of a run only when its section is in the config.
    plain = parse_config(run_config("/tmp/x"))
    assert "pixels" not in [c.name for c in stages_for(plain)]
    assert "pixels" in [c.name for c in stages_for(parse_config(run_config("/tmp/x", pixels={})))]


def test_an_added_stage_section_is_validated_and_unknown_sections_are_errors():
    cfg = parse_config(run_config("/tmp/x", pixels={"large_mp": 5}))
    assert cfg.stage_section("pixels").large_mp == 5.0
    assert cfg.model_dump(mode="json")["pixels"] == {"large_mp": 5.0}
    with pytest.raises(ConfigError, match="pixels.large_mp"):
        parse_config(run_config("/tmp/x", pixels={"large_mp": "many"}))
    with pytest.raises(ConfigError, match="pixles: unknown section"):
        parse_config(run_config("/tmp/x", pixles={}))


def test_an_added_stage_runs_in_the_flow_resumes_and_shows_in_status(build, tmp_path):
    images = _images(tmp_path / "img")
    cfg = run_config(tmp_path, images, pixels={"large_mp": 3.0}, captioner={"backend": "none"}, ingest={"partition_size": 1})
    first = build(cfg, run_id="px")
    assert _computed(first)["pixels"] == 3  # partitions, one per ingest partition
    table = read_tables(Storage(), str(tmp_path / "work" / "px" / "pixels"), "part", PIXELS)
    got = dict(zip(table["uid"].to_pylist(), table["large"].to_pylist()))
    assert sorted(got.values()) == [False, True, True]  # 1.92, 3.12 and 4.32 MP

    again = build(cfg, run_id="px")  # resumable: nothing of it is computed twice
    assert _computed(again)["pixels"] == 0 and _computed(again)["ingest"] == 0
    changed = build(deep_merge(cfg, {"pixels": {"large_mp": 4.0}}), run_id="px")
    assert _computed(changed)["pixels"] == 3 and _computed(changed)["ingest"] == 0 and _computed(changed)["shard"] == 0

    status = run_status(Storage(), str(tmp_path / "work"), "px")
    row = next(s for s in status["stages"] if s["stage"] == "pixels")
    assert row["state"] == "done" and row["done"] == 3 and row["rows"] == {"images": 3}
    assert "pixels" in format_status(status)


def _copy_sources(dest: Path) -> Path:
    for pkg in code.PACKAGES:
        shutil.copytree(code.ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_code_fingerprints_follow_imports_transitively(tmp_path):
    root = _copy_sources(tmp_path / "src")
    regions = code.module_closure("pipeline.regions.stage", root)
    shard = code.module_closure("pipeline.shards.stage", root)
    assert "pipeline.regions.sam" in regions  # imported lazily, inside a function of proposers.py
    assert "schemas.sample" in shard and "pipeline.shards.writer" in shard
    assert "pipeline.train.loop" not in regions | shard

    before = {m: code.code_fingerprint(m, root) for m in ("pipeline.regions.stage", "pipeline.shards.stage", "pipeline.ingest.stage")}
    code._code_fingerprint.cache_clear()
    with open(root / "pipeline" / "train" / "loop.py", "a") as f:
        f.write("\n# an edit no stage imports\n")
    assert {m: code.code_fingerprint(m, root) for m in before} == before
    code._code_fingerprint.cache_clear()
    with open(root / "pipeline" / "regions" / "sam.py", "a") as f:
        f.write("\n# an edit the regions stage reaches through proposers.py\n")
    after = {m: code.code_fingerprint(m, root) for m in before}
    assert after["pipeline.regions.stage"] != before["pipeline.regions.stage"]
    assert after["pipeline.ingest.stage"] == before["pipeline.ingest.stage"]


def test_an_edit_to_an_indirect_import_recomputes_that_stage_in_the_flow(build, tmp_path, monkeypatch):
    images = _images(tmp_path / "img", 2)
    cfg = run_config(tmp_path, images, captioner={"backend": "none"}, ingest={"partition_size": 1})
    assert sum(_computed(build(cfg, run_id="fp")).values()) > 0
    root = _copy_sources(tmp_path / "src")
    with open(root / "pipeline" / "regions" / "sam.py", "a") as f:
        f.write("\n# edited\n")
    monkeypatch.setattr(code, "ROOT", root)  # the copy stands for the edited checkout
    computed = _computed(build(cfg, run_id="fp"))
    assert computed["regions"] == 2 and computed["ingest"] == 0 and computed["dedupe"] == 0


def test_a_config_checked_by_the_cli_is_not_checked_again_by_the_flow(build, tmp_path, monkeypatch):
    from pipeline import preflight

    calls = []
    real = preflight.check_writable
    monkeypatch.setattr(preflight, "check_writable", lambda uri, field, buckets: calls.append(field) or real(uri, field, buckets))
    cfg = parse_config(run_config(tmp_path, _images(tmp_path / "img", 1), captioner={"backend": "none"}))
    preflight.check_run(cfg)  # what the CLI does before Prefect starts
    assert calls == ["run.work_dir", "shards.output"]
    build(cfg, run_id="once")
    assert calls == ["run.work_dir", "shards.output"]
    # A dict (a deployment's parameter) is parsed and checked by the flow itself.
    build(cfg.model_dump(mode="json"), run_id="once")
    assert calls == ["run.work_dir", "shards.output"] * 2


def test_the_adding_a_stage_example_in_the_docs_is_this_stage():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    example = doc.split("## Adding a stage", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    source = Path(__file__).read_text()
    here = source[source.index("PIXELS = "):source.index("\n\n\ndef _images")] + "\n"
    assert example == here
