"""Run a stage's partitions as Ray tasks, skipping the ones a previous attempt finished.

The work is a callable `work(payload) -> {file_prefix: table}` (a Stage, pipeline/stage.py, which
also decides the partitions and their fingerprints); this module only decides what is left to do, ships it to Ray, writes the results atomically (side tables first, the
`part` marker last) and shows progress. Executors stay apart from the work, as in datatrove.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import ray
from tqdm.auto import tqdm

from pipeline import verbose
from pipeline.partitions import (
    part_name,
    partition_index,
    read_fingerprint,
    write_table,
)
from pipeline.storage import Storage, join
from schemas.config import RaySection

log = logging.getLogger("localcap")

Work = Callable[[Any], dict[str, pa.Table]]


@dataclass(frozen=True)
class PartitionJob:
    index: int
    fingerprint: str
    payload: Any
    redo: bool = False  # recompute even when a partition with this fingerprint exists (it recorded failures)


@dataclass
class StageReport:
    stage: str
    partitions: int = 0
    computed: int = 0
    skipped: int = 0
    seconds: float = 0.0  # this attempt
    total_seconds: float = 0.0  # every attempt of this run id that had work to do, killed ones included
    rows: dict[str, int] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)  # Ray node ids that computed partitions
    cpu_seconds: float = 0.0  # CPU time of the partitions computed this attempt, in their workers


PLAN, REPORT = "_plan.json", "_report.json"  # per stage folder: what is to be done, what was done (localcap status)
ATTEMPT = "_attempt-"  # per stage folder, one per attempt that had work: its seconds so far (a kill loses at most ATTEMPT_EVERY_S)
ATTEMPT_EVERY_S = 5.0


class _AttemptRecord:
    """This attempt's seconds in STAGE/_attempt-<start>.json, rewritten as partitions finish (at most
    every ATTEMPT_EVERY_S), so that a killed attempt's time still counts in the stage's cost."""

    def __init__(self, storage: Storage, stage_dir: str, start: float, todo: int):
        self.storage, self.start, self.todo, self.written = storage, start, todo, 0.0
        self.uri = join(stage_dir, f"{ATTEMPT}{time.time_ns()}.json")
        self.write(0, force=True)

    def write(self, done: int, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.written >= ATTEMPT_EVERY_S:
            self.written = now
            self.storage.write_bytes(self.uri, json.dumps({"todo": self.todo, "done": done, "seconds": round(now - self.start, 3)}).encode())


def attempts_seconds(storage: Storage, stage_dir: str) -> float:
    """What every attempt of a stage that had work to do took, from their records."""
    total = 0.0
    for name in storage.list_prefix(stage_dir):
        if name.startswith(ATTEMPT) and name.endswith(".json"):
            try:
                total += float(json.loads(storage.read_bytes(join(stage_dir, name)))["seconds"])
            except (ValueError, KeyError, TypeError):  # cut short by a kill as it was written
                continue
    return round(total, 3)


_cpu_stage_resource: str | None = None  # set by init_ray from ray.cpu_stage_resource
_ray_config: RaySection | None = None  # how ensure_ray starts Ray (init_ray's)


def init_ray(cfg: RaySection, on_demand: bool = False) -> None:
    """Join the cluster at ray.address / RAY_ADDRESS, else start a local Ray (once per process). A local
    Ray is asked for by name ("local"): ray.init() with no address would join whatever cluster `ray
    start` last started on this machine, someone else's included.

    `on_demand`: only note how; Ray starts when something first needs it (`ensure_ray`: a stage with
    partitions to compute, a look at the cluster's GPUs), so a rerun with nothing left to do starts
    no Ray (seconds on a laptop, more against a cluster)."""
    global _cpu_stage_resource, _ray_config
    _cpu_stage_resource, _ray_config = cfg.cpu_stage_resource, cfg
    if not on_demand:
        ensure_ray()


def ensure_ray() -> None:
    """Ray up as init_ray said (a local one by default)."""
    if not ray.is_initialized():
        cfg = _ray_config or RaySection()
        address = cfg.address or os.environ.get("RAY_ADDRESS") or "local"
        # Ray's worker, controller and cleaner lines stay out of the terminal and the Prefect logs unless
        # --verbose; what localcap reports (progress, warnings) goes through the driver.
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": verbose()}
        if address == "local":
            kwargs["num_cpus"] = cfg.num_cpus
        ray.init(address=address, **kwargs)


def cluster_resources() -> dict[str, float]:
    """The Ray cluster's resources (Ray started first, if it is not yet)."""
    ensure_ray()
    return ray.cluster_resources()


def _compute_partition(work: Work, job: PartitionJob, stage_dir: str, storage: Storage,
                       schemas: dict[str, pa.Schema] | None = None) -> dict[str, int]:
    started = time.process_time()
    counts = _write_partition(work(job.payload), job, stage_dir, storage, schemas)
    return {**counts, NODE: ray.get_runtime_context().get_node_id(), CPU: time.process_time() - started}


NODE = "__node__"  # where a partition was computed, returned beside its row counts
CPU = "__cpu__"  # and the CPU seconds its worker process spent on it (all its threads)


def _write_partition(tables: dict[str, pa.Table], job: PartitionJob, stage_dir: str, storage: Storage,
                     schemas: dict[str, pa.Schema] | None = None) -> dict[str, int]:
    """Side tables first, the `part` marker last: a partition is done only once its marker exists.
    With `schemas` (the stage's declared outputs), a table of another name or shape is a bug, caught
    before anything is written."""
    if schemas is not None:
        check_outputs(tables, schemas, stage_dir)
    tables = dict(tables)
    marker = tables.pop("part")
    for prefix, table in tables.items():
        write_table(storage, join(stage_dir, part_name(job.index, prefix)), table, job.fingerprint)
    write_table(storage, join(stage_dir, part_name(job.index)), marker, job.fingerprint)
    return {"part": marker.num_rows, **{p: t.num_rows for p, t in tables.items()}}


def check_outputs(tables: dict[str, pa.Table], schemas: dict[str, pa.Schema], where: str) -> None:
    if "part" not in tables:
        raise ValueError(f"{where}: a partition must return its 'part' marker table, got {sorted(tables)}")
    for prefix, table in tables.items():
        want = schemas.get(prefix)
        if want is None:
            raise ValueError(f"{where}: table {prefix!r} is not among the stage's declared outputs {sorted(schemas)}")
        if not table.schema.equals(want, check_metadata=False):
            raise ValueError(f"{where}: table {prefix!r} does not match its declared schema:\n{table.schema}\nwanted:\n{want}")


_run_partition = ray.remote(_compute_partition)


@ray.remote
class _PartitionActor:
    """Holds a stateful work object (e.g. a loaded model) across partitions."""

    def __init__(self, factory: Callable[[], Work]):
        self.work = factory()

    def run(self, job: PartitionJob, stage_dir: str, storage: Storage, schemas: dict | None = None) -> dict[str, int]:
        return _compute_partition(self.work, job, stage_dir, storage, schemas)


@dataclass(frozen=True)
class ActorPool:
    """Run a stage on `size` long-lived actors, each built once by `factory()` (a model load),
    instead of one Ray task per partition. `resources` go to each actor (e.g. {"num_gpus": 1}).

    A partition whose actor dies is retried on the restarted actor (`max_task_retries` times, Ray's
    own mechanism). When it still fails, `on_failure(payload, error)` may return the tables to write
    instead (e.g. every row marked failed, so that nothing is lost and a rerun redoes just that), and
    the actor is replaced by a fresh one; without `on_failure` the stage fails."""

    factory: Callable[[], Work]
    size: int
    resources: dict = field(default_factory=dict)
    max_task_retries: int = 2
    on_failure: Callable[[Any, str], dict[str, pa.Table]] | None = None


class _Workers:
    """Where partitions run: Ray tasks, or the actors of a pool (one slot per actor)."""

    def __init__(self, work: Work, stage_dir: str, storage: Storage, num_cpus: float, pool: ActorPool | None,
                 schemas: dict[str, pa.Schema] | None = None):
        self.work, self.stage_dir, self.storage, self.pool, self.schemas = work, stage_dir, storage, pool, schemas
        if pool is None:
            # On a cluster whose CPU nodes carry the marker resource, CPU tasks ask for a sliver of
            # it: Ray's own GPU-node avoidance is only a preference (infra/ray/README.md).
            marker = _cpu_stage_resource if _cpu_stage_resource and ray.cluster_resources().get(_cpu_stage_resource) else None
            self.remote = _run_partition.options(num_cpus=num_cpus, max_retries=2, **({"resources": {marker: 0.001}} if marker else {}))
            # Enough tasks queued to keep every CPU busy, not the whole stage: payloads stay small
            # in the object store and a failure cancels little work.
            self.in_flight = max(2, int(2 * ray.cluster_resources().get("CPU", 1) / num_cpus))
        else:
            self.actors = [self._new_actor() for _ in range(pool.size)]
            self.turn = itertools.cycle(range(pool.size))
            self.in_flight = 2 * pool.size

    def _new_actor(self):
        return _PartitionActor.options(max_restarts=1, max_task_retries=self.pool.max_task_retries,
                                       **self.pool.resources).remote(self.pool.factory)

    def submit(self, job: PartitionJob):
        """(object ref, slot) of the job's run."""
        if self.pool is None:
            return self.remote.remote(self.work, job, self.stage_dir, self.storage, self.schemas), None
        slot = next(self.turn)
        return self.actors[slot].run.remote(job, self.stage_dir, self.storage, self.schemas), slot

    def failed(self, job: PartitionJob, slot: int | None, exc: Exception) -> dict[str, int]:
        """Counts of the fallback tables written for a job that failed for good; re-raises when the
        stage has no fallback."""
        if self.pool is None or self.pool.on_failure is None:
            raise exc
        log.warning("partition %d failed after retries, recorded as failed: %s", job.index, exc)
        if isinstance(exc, ray.exceptions.RayActorError):
            ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot] = self._new_actor()
        return _write_partition(self.pool.on_failure(job.payload, f"{type(exc).__name__}: {exc}"), job, self.stage_dir,
                                self.storage, self.schemas)

    def shutdown(self) -> None:
        for actor in getattr(self, "actors", []):
            ray.kill(actor, no_restart=True)


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
    outputs: list[str] | tuple[str, ...] = (),
    schemas: dict[str, pa.Schema] | None = None,
) -> StageReport:
    """Compute every job whose `STAGE/part-NNNNN.parquet` is missing, stamped differently, or
    marked `redo`.

    `marker` names the rows of the part files in the report (e.g. "images" for ingest). With a
    `pool`, partitions go to its actors (`work` is then unused); otherwise each is a Ray task.
    `outputs` are folders outside the run folder that the partitions write into (the shard tars'
    shards.output). `schemas`: the stage's declared output tables, checked before writing.

    First, what an earlier attempt of this run id left when it was killed goes: temporaries
    (Storage.atomic_path's) anywhere in the run folder and in `outputs` (on S3: incomplete multipart
    uploads under them). Nothing of this run writes there while a stage starts (stages run one at a
    time, and a run id is run by one process at a time).
    """
    start = time.perf_counter()
    stage_dir = join(run_dir, stage)
    removed = sum(storage.remove_temporaries(folder, recursive=True) for folder in (run_dir, *outputs))
    if removed:
        log.info("%s: removed %d temporary file(s) / incomplete upload(s) an interrupted attempt left", stage, removed)
    existing = set(storage.list_prefix(stage_dir))
    for name in sorted(existing):
        # Partitions of an earlier attempt with more inputs or shards would be read as this run's.
        index = partition_index(name)
        if index is not None and index >= len(jobs):
            storage.delete(join(stage_dir, name))
            existing.discard(name)
    todo = [j for j in jobs if j.redo or part_name(j.index) not in existing
            or read_fingerprint(storage, join(stage_dir, part_name(j.index))) != j.fingerprint]
    report = StageReport(stage, partitions=len(jobs), skipped=len(jobs) - len(todo))
    storage.write_bytes(join(stage_dir, PLAN), json.dumps({"partitions": len(jobs), "todo": len(todo), "started_at": time.time()}).encode())
    if report.skipped:
        log.info("%s: %d of %d partitions already done, skipped", stage, report.skipped, len(jobs))
    if todo:
        ensure_ray()
        attempt = _AttemptRecord(storage, stage_dir, start, len(todo))
        workers = _Workers(work, stage_dir, storage, num_cpus, pool, schemas)
        queue = iter(todo)
        pending: dict = {}

        def refill(n: int) -> None:
            for job in itertools.islice(queue, n):
                ref, slot = workers.submit(job)
                pending[ref] = (job, slot)

        refill(workers.in_flight)
        bar = tqdm(total=len(jobs), initial=report.skipped, desc=stage, unit="part", disable=not progress, file=sys.stderr)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job, slot = pending.pop(ready[0])
                try:
                    counts = ray.get(ready[0])
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    counts = workers.failed(job, slot, exc)
                    report.rows["failed_partitions"] = report.rows.get("failed_partitions", 0) + 1
                refill(1)
                report.computed += 1
                report.cpu_seconds += counts.pop(CPU, 0.0)
                node = counts.pop(NODE, None)
                if node and node not in report.nodes:
                    report.nodes.append(node)
                for key, n in counts.items():
                    key = marker if key == "part" else key
                    report.rows[key] = report.rows.get(key, 0) + n
                bar.update(1)
                attempt.write(report.computed)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
            workers.shutdown()
        attempt.write(report.computed, force=True)
    report.seconds, report.cpu_seconds = round(time.perf_counter() - start, 3), round(report.cpu_seconds, 3)
    report.total_seconds = attempts_seconds(storage, stage_dir)
    storage.write_bytes(join(stage_dir, REPORT), json.dumps({**asdict(report), "marker": marker, "finished_at": time.time()}).encode())
    return report
