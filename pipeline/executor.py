"""Run a stage's partitions as Ray tasks, skipping the ones a previous attempt finished.

The stage logic is a plain function `work(payload) -> {file_prefix: table}`; this module only
decides what is left to do, ships it to Ray, writes the results atomically (side tables first, the
`part` marker last) and shows progress. Executors stay apart from the work, as in datatrove.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import ray
from tqdm.auto import tqdm

from pipeline.partitions import part_name, partition_index, read_fingerprint, write_table
from pipeline.storage import Storage, join
from schemas.config import RaySection

log = logging.getLogger("localcap")

Work = Callable[[Any], dict[str, pa.Table]]


@dataclass(frozen=True)
class PartitionJob:
    index: int
    fingerprint: str
    payload: Any


@dataclass
class StageReport:
    stage: str
    partitions: int = 0
    computed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    rows: dict[str, int] = field(default_factory=dict)


def init_ray(cfg: RaySection) -> None:
    """Join the cluster at ray.address / RAY_ADDRESS, else start a local Ray (once per process)."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    if address is None:
        kwargs["num_cpus"] = cfg.num_cpus
    ray.init(address=address, **kwargs)


def _compute_partition(work: Work, job: PartitionJob, stage_dir: str, storage: Storage) -> dict[str, int]:
    tables = work(job.payload)
    marker = tables.pop("part")
    for prefix, table in tables.items():
        write_table(storage, join(stage_dir, part_name(job.index, prefix)), table, job.fingerprint)
    write_table(storage, join(stage_dir, part_name(job.index)), marker, job.fingerprint)
    return {"part": marker.num_rows, **{p: t.num_rows for p, t in tables.items()}}


_run_partition = ray.remote(_compute_partition)


@ray.remote
class _PartitionActor:
    """Holds a stateful work object (e.g. a loaded model) across partitions."""

    def __init__(self, factory: Callable[[], Work]):
        self.work = factory()

    def run(self, job: PartitionJob, stage_dir: str, storage: Storage) -> dict[str, int]:
        return _compute_partition(self.work, job, stage_dir, storage)


@dataclass(frozen=True)
class ActorPool:
    """Run a stage on `size` long-lived actors, each built once by `factory()` (a model load),
    instead of one Ray task per partition. `resources` go to each actor (e.g. {"num_gpus": 1})."""

    factory: Callable[[], Work]
    size: int
    resources: dict = field(default_factory=dict)


def _submitter(work: Work, stage_dir: str, storage: Storage, num_cpus: float, pool: ActorPool | None):
    """(job -> object ref, how many jobs to keep in flight). Enough are queued to keep every CPU (or
    actor) busy, not the whole stage: payloads stay small in the object store and a failure cancels
    little work."""
    if pool is None:
        remote = _run_partition.options(num_cpus=num_cpus, max_retries=2)
        in_flight = max(2, int(2 * ray.cluster_resources().get("CPU", 1) / num_cpus))
        return (lambda job: remote.remote(work, job, stage_dir, storage)), in_flight
    actors = [_PartitionActor.options(max_restarts=1, max_task_retries=2, **pool.resources).remote(pool.factory)
              for _ in range(pool.size)]
    turn = itertools.cycle(actors)
    return (lambda job: next(turn).run.remote(job, stage_dir, storage)), 2 * len(actors)


def run_stage(
    stage: str,
    run_dir: str,
    jobs: list[PartitionJob],
    work: Work,
    storage: Storage,
    num_cpus: float = 1,
    progress: bool = True,
    marker: str = "rows",
    pool: ActorPool | None = None,
) -> StageReport:
    """Compute every job whose `STAGE/part-NNNNN.parquet` is missing or stamped differently.

    `marker` names the rows of the part files in the report (e.g. "images" for ingest). With a
    `pool`, partitions go to its actors (`work` is then unused); otherwise each is a Ray task.
    """
    start = time.perf_counter()
    stage_dir = join(run_dir, stage)
    existing = set(storage.list_prefix(stage_dir))
    for name in sorted(existing):
        # Partitions of an earlier attempt with more inputs or shards would be read as this run's.
        index = partition_index(name)
        if index is not None and index >= len(jobs):
            storage.delete(join(stage_dir, name))
            existing.discard(name)
    todo = [j for j in jobs if part_name(j.index) not in existing or read_fingerprint(storage, join(stage_dir, part_name(j.index))) != j.fingerprint]
    report = StageReport(stage, partitions=len(jobs), skipped=len(jobs) - len(todo))
    if report.skipped:
        log.info("%s: %d of %d partitions already done, skipped", stage, report.skipped, len(jobs))
    if todo:
        submit, max_in_flight = _submitter(work, stage_dir, storage, num_cpus, pool)
        queue = iter(todo)
        pending = [submit(job) for job in itertools.islice(queue, max_in_flight)]
        bar = tqdm(total=len(jobs), initial=report.skipped, desc=stage, unit="part", disable=not progress, file=sys.stderr)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                pending += [submit(job) for job in itertools.islice(queue, len(ready))]
                for counts in ray.get(ready):
                    report.computed += 1
                    for key, n in counts.items():
                        key = marker if key == "part" else key
                        report.rows[key] = report.rows.get(key, 0) + n
                    bar.update(1)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
    report.seconds = round(time.perf_counter() - start, 3)
    return report
