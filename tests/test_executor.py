"""The executor's actor pools: partitions survive a worker that cannot run, and are recorded as
failed through the stage's fallback instead of failing the run."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.executor import ActorPool, PartitionJob, run_stage
from pipeline.partitions import part_name, read_table
from pipeline.storage import Storage

SCHEMA = pa.schema([("job", pa.int64()), ("status", pa.string())])


class BrokenModel:
    """A work object whose construction fails, like an engine that cannot load."""

    def __init__(self):
        raise RuntimeError("engine failed to start")

    def __call__(self, payload):  # pragma: no cover - never constructed
        return {"part": pa.table({"job": [payload], "status": ["ok"]}, schema=SCHEMA)}


class Model:
    def __call__(self, payload):
        return {"part": pa.table({"job": [payload], "status": ["ok"]}, schema=SCHEMA)}


def _failed(payload, error):
    return {"part": pa.table({"job": [payload], "status": [f"failed: {error[:40]}"]}, schema=SCHEMA)}


def test_a_pool_that_cannot_start_records_every_partition_as_failed(ray_local, tmp_path):
    jobs = [PartitionJob(i, f"fp{i}", i) for i in range(3)]
    pool = ActorPool(BrokenModel, size=1, resources={"num_cpus": 0.5}, max_task_retries=0, on_failure=_failed)
    report = run_stage("s", str(tmp_path), jobs, None, Storage(), progress=False, pool=pool)
    assert report.computed == 3 and report.rows["failed_partitions"] == 3
    for i in range(3):
        t = read_table(Storage(), str(tmp_path / "s" / part_name(i))).to_pylist()
        assert t[0]["job"] == i and t[0]["status"].startswith("failed: ")


def test_without_a_fallback_the_stage_fails(ray_local, tmp_path):
    pool = ActorPool(BrokenModel, size=1, resources={"num_cpus": 0.5}, max_task_retries=0)
    with pytest.raises(Exception, match="engine failed to start"):
        run_stage("s", str(tmp_path), [PartitionJob(0, "fp", 0)], None, Storage(), progress=False, pool=pool)


def test_a_working_pool_and_redo(ray_local, tmp_path):
    pool = ActorPool(Model, size=2, resources={"num_cpus": 0.5})
    jobs = [PartitionJob(i, f"fp{i}", i) for i in range(4)]
    assert run_stage("s", str(tmp_path), jobs, None, Storage(), progress=False, pool=pool).computed == 4
    again = [PartitionJob(i, f"fp{i}", i, redo=(i == 2)) for i in range(4)]
    report = run_stage("s", str(tmp_path), again, None, Storage(), progress=False, pool=pool)
    assert (report.computed, report.skipped) == (1, 3)


_NOTHING_TO_DO = """
import sys, ray, pyarrow as pa
from pipeline.executor import PartitionJob, init_ray, run_stage
from pipeline.partitions import part_name, write_table
from pipeline.storage import Storage
from schemas.config import RaySection

folder, storage = sys.argv[1], Storage()
for i in range(2):  # both partitions done already, with the fingerprints asked for
    write_table(storage, f"{folder}/s/{part_name(i)}", pa.table({"job": [i]}), f"fp{i}")
init_ray(RaySection(num_cpus=1), on_demand=True)
jobs = [PartitionJob(i, f"fp{i}", i) for i in range(2)]
report = run_stage("s", folder, jobs, lambda p: {"part": pa.table({"job": [p]})}, storage, progress=False)
print("nothing to do:", report.skipped, report.computed, ray.is_initialized())
report = run_stage("s", folder, [*jobs, PartitionJob(2, "fp2", 2)], lambda p: {"part": pa.table({"job": [p]})}, storage, progress=False)
print("one to do:", report.skipped, report.computed, ray.is_initialized(), report.cpu_seconds >= 0)
"""


def test_ray_starts_only_when_a_stage_has_partitions_to_compute(tmp_path):
    """A rerun with nothing left to do starts no Ray (the no-op rerun's seconds); the first partition
    to compute starts it."""
    import subprocess
    import sys
    from pathlib import Path

    env = {"RAY_AUTH_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _NOTHING_TO_DO, str(tmp_path)], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nothing to do: 2 0 False" in out.stdout and "one to do: 2 1 True True" in out.stdout, out.stdout
