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
