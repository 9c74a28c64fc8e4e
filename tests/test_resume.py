"""A run killed with SIGKILL mid-stage resumes with the same run id to byte-identical output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.partitions import part_name
from pipeline.synthetic import encode, generate_scene
from tests.helpers.config import run_config
from tests.helpers.prefect_home import prefect_home

N_IMAGES = 24


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _without_times(dataset_json: bytes) -> dict:
    data = json.loads(dataset_json)
    for key in ("created_at", "updated_at", "timings", "builds"):  # what the work cost and when: differs between any two runs
        data.pop(key)
    return data


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(build, tmp_path, prefect_harness):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(N_IMAGES):  # PNGs decode fully, so the ingest stage lasts long enough to be killed
        img, _ = generate_scene(300 + i, 2048, 1536, n_objects=3)
        (src / f"{i:03d}.png").write_bytes(encode(img, "PNG", compress_level=1))
    work, out = tmp_path / "work", tmp_path / "ds"
    cfg = run_config(tmp_path, src, work=work, output=out, ray={"num_cpus": 1}, ingest={"partition_size": 1},
                     shards={"max_samples": 5})

    # The reference: an uninterrupted run, then moved aside so the killed run uses the same paths.
    build(cfg, run_id="r1")
    shutil.move(out, tmp_path / "reference")
    shutil.rmtree(work)

    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    # The session's Prefect server (the CLI talks to it over HTTP; its database stays the server's).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=prefect_home(tmp_path / "prefect-home"), PREFECT_API_URL=prefect_harness)
    cmd = [sys.executable, "-m", "flows.cli", "run", str(config_path), "--run-id", "r1", "--no-progress"]
    log_path = tmp_path / "killed-run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT)
        ingest_dir = work / "r1" / "ingest"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(ingest_dir.glob("part-*.parquet")) if ingest_dir.exists() else []) >= 3:
                break
            time.sleep(0.05)
        alive = proc.poll() is None
        with contextlib.suppress(ProcessLookupError):  # nothing left to kill if the run already ended
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert alive, "the run ended before it could be killed:\n" + log_path.read_text()[-3000:]
    # Ray workers sit in process groups of their own and die once they notice their raylet is gone:
    # wait until no partition has appeared for 3 s before taking stock.
    done_at_kill = sorted(p.name for p in ingest_dir.glob("part-*.parquet"))
    settled = time.monotonic()
    while time.monotonic() - settled < 3:
        time.sleep(0.2)
        now = sorted(p.name for p in ingest_dir.glob("part-*.parquet"))
        if now != done_at_kill:
            done_at_kill, settled = now, time.monotonic()
    assert 3 <= len(done_at_kill) < N_IMAGES, done_at_kill
    assert not (out / "dataset.json").exists()
    mtimes = {n: (ingest_dir / n).stat().st_mtime_ns for n in done_at_kill}

    build(cfg, run_id="r1")

    run = json.loads((work / "r1" / "run.json").read_text())
    ingest = next(s for s in run["stages"] if s["stage"] == "ingest")
    assert ingest["skipped"] >= len(done_at_kill) and ingest["skipped"] + ingest["computed"] == N_IMAGES, (ingest, done_at_kill)
    assert {n: (ingest_dir / n).stat().st_mtime_ns for n in done_at_kill} == mtimes  # not redone

    reference, resumed = _files(tmp_path / "reference"), _files(out)
    assert sorted(reference) == sorted(resumed)
    for name in reference:
        if name == "dataset.json":
            assert _without_times(reference[name]) == _without_times(resumed[name])
        else:
            assert reference[name] == resumed[name], f"{name} differs"
    assert len([n for n in reference if n.endswith(".tar")]) == 2 * 5  # 24 samples, 5 per shard


def test_rerun_of_finished_run_skips_everything(build, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        img, _ = generate_scene(400 + i, 1200, 1100, n_objects=1)
        (src / f"{i}.jpg").write_bytes(encode(img))
    cfg = run_config(tmp_path, src, work="w", ingest={"partition_size": 2})
    build(cfg, run_id="again")
    first = _files(tmp_path / "ds")
    build(cfg, run_id="again")
    run = json.loads((tmp_path / "w" / "again" / "run.json").read_text())
    assert all(s["computed"] == 0 and s["skipped"] == s["partitions"] for s in run["stages"])
    second = _files(tmp_path / "ds")
    assert {k: v for k, v in first.items() if k != "dataset.json"} == {k: v for k, v in second.items() if k != "dataset.json"}

    # Changing a stage's config recomputes that stage only where its fingerprint changed.
    cfg["shards"]["max_samples"] = 1
    build(cfg, run_id="again")
    run = json.loads((tmp_path / "w" / "again" / "run.json").read_text())
    by_stage = {s["stage"]: s for s in run["stages"]}
    assert by_stage["ingest"]["computed"] == 0 and by_stage["shard"]["computed"] == 3
    assert sorted(json.loads((tmp_path / "ds" / "image" / "sizes.json").read_text())) == [f"image_{i:06d}.tar" for i in range(3)]

    # Fewer inputs: partitions past the new end are dropped, not counted twice.
    (src / "2.jpg").unlink()
    dataset = build(cfg, run_id="again")
    assert dataset["counts"]["inputs"] == 2 == dataset["counts"]["samples"]
    assert sorted(p.name for p in (tmp_path / "w" / "again" / "ingest").glob("*.parquet")) == [part_name(0), part_name(0, "rejects")]
