"""One way to define a stage: a `Stage` subclass in a stage module, found by the registry.

A stage declares what it is (name, the stages it reads, the tables it writes, its resources) and
does its own work (`partitions()` on the driver, `setup()`/`process()` on the workers); everything
generic is `run()`'s: the fingerprint of each partition (the stage's key for it, plus the code
fingerprint computed from the stage module's imports, pipeline/code.py), skipping what is done,
redoing partitions that recorded failures a rerun can fix, the failure suffix later stages see,
timings, stats and progress (pipeline/executor.py). docs/architecture.md shows how to add one.

The registry holds every subclass defined (by `__init_subclass__`); `registered()` first imports the
stage module of every sub-package of `pipeline` (`pipeline/*/stage.py`) and of the `localcap.stages`
entry points, then orders the stages by what they need.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from pipeline.code import code_fingerprint
from pipeline.executor import ActorPool, PartitionJob, StageReport, run_stage
from pipeline.partitions import fingerprint, part_name, read_fingerprint
from pipeline.storage import Storage, join
from schemas.config import STAGE_SECTIONS, RunConfig, load_stage_plugins

log = logging.getLogger("localcap")


@dataclass
class RunContext:
    """What every stage of a run shares: the parsed config, the run id, storage, and a per-run memo
    (tables several stages read, read once)."""

    config: RunConfig
    run_id: str
    storage: Storage
    progress: bool = True
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def run_dir(self) -> str:
        return join(self.config.run.work_dir, self.run_id)

    def stage_dir(self, stage: str) -> str:
        return join(self.run_dir, stage)

    def __getstate__(self) -> dict:  # shipped to workers inside a Stage: the memo stays on the driver
        return {**self.__dict__, "memo": {}}


def make_context(config: RunConfig, run_id: str, progress: bool = True) -> RunContext:
    return RunContext(config, run_id, Storage(config.storage.endpoint_url, config.storage.region), progress)


@dataclass(frozen=True)
class Tasks:
    """Each partition is a Ray task asking for `num_cpus`."""

    num_cpus: float = 1


@dataclass(frozen=True)
class Actors:
    """Partitions go to `count` long-lived actors (a model loads once per actor), each with `resources`
    (e.g. {"num_gpus": 1, "accelerator_type": ...}); sized by pipeline/placement.py for GPUs."""

    count: int
    resources: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Partition:
    """One unit of a stage's work: `key` is what it is computed from (JSON-able: config, the input
    partitions' fingerprints, ...); `payload` is what `process()` gets."""

    key: Any
    payload: Any


@dataclass
class StageResult:
    """What later stages see of a stage: its report, and per partition the fingerprint it was
    computed with (with the failure suffix), or None when the stage is off."""

    report: StageReport
    fingerprints: list[str] | None

    @property
    def on(self) -> bool:
        return self.fingerprints is not None


STAGES = {}  # the registry: name -> Stage subclass, every one defined (filled by Stage.__init_subclass__)


class Stage:
    """Base of every stage. Subclasses set the class attributes and implement `partitions` and
    `process`; the rest has defaults."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()  # stages whose output this one reads (it runs after them)
    outputs: ClassVar[dict[str, pa.Schema]] = {}  # file prefix -> schema; "part" is the completion marker
    marker: ClassVar[str] = "rows"  # what the marker's rows are called in reports and `status`
    # An added stage's own config section (a schemas.base.Section), read from the run config's
    # top-level key named after the stage; the stage runs only in runs whose config has it. Built-in
    # stages read their sections of RunConfig instead (schemas/config.py) and leave this None.
    section: ClassVar[type | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return  # an abstract intermediate class
        if "part" not in cls.outputs:
            raise TypeError(f"stage {cls.name}: outputs must declare the 'part' marker table")
        other = STAGES.get(cls.name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise TypeError(f"two stages named {cls.name!r}: {other.__module__}.{other.__qualname__} and {cls.__module__}.{cls.__qualname__}")
        STAGES[cls.name] = cls  # the same class again (a module reloaded) replaces itself
        if cls.section is not None:
            if cls.name in RunConfig.model_fields:
                raise TypeError(f"stage {cls.name}: its section would shadow the built-in section {cls.name!r}")
            STAGE_SECTIONS[cls.name] = cls.section

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    # -- declared by each stage ------------------------------------------------------------------
    def enabled(self) -> bool:
        """False: the stage runs no partitions (and what an earlier attempt wrote is cleared). By
        default an added stage runs when its section is in the config, a built-in one always."""
        return self.section is None or self.options is not None

    def check(self) -> None:
        """Preflight: raise ValueError (or RuntimeError) naming the config field for what no retry
        can fix; it is reported as a PreflightError. Runs once per run, before Ray starts
        (pipeline.preflight.check_run)."""

    def check_cluster(self) -> None:
        """Preflight once Ray is up (e.g. the GPUs the stage's actors need are in the cluster)."""

    def resources(self) -> Tasks | Actors:
        return Tasks()

    def partitions(self, inputs: dict[str, StageResult]) -> list[Partition]:
        """The stage's work cut into partitions, from the results of the stages it `needs`."""
        raise NotImplementedError

    def setup(self) -> None:
        """Once per worker (an actor's life, or a task), before its first `process` call."""

    def process(self, payload) -> dict[str, pa.Table]:
        """One partition's tables by file prefix ("part" is written last, as the marker)."""
        raise NotImplementedError

    def recorded_failures(self, index: int) -> int:
        """Failures a finished partition recorded that a rerun should redo (0: none counted); its
        partition is then redone, and later stages see its fingerprint change as they get fixed."""
        return 0

    def redo_payload(self, payload, index: int):
        """The payload of a partition being redone for its recorded failures (e.g. with its earlier
        output attached, so that only what failed is done again)."""
        return payload

    def failed(self, payload, error: str) -> dict[str, pa.Table] | None:
        """Tables to record for a partition that failed for good on an actor (None: the stage fails)."""
        return None

    def external_outputs(self) -> list[str]:
        """Folders outside the run folder that partitions write into (cleared of temporaries first)."""
        return []

    def finish(self, report: StageReport, inputs: dict[str, StageResult]) -> None:
        """After the partitions: add figures to the report, write stage-level files."""

    # -- generic ---------------------------------------------------------------------------------
    @property
    def config(self) -> RunConfig:
        return self.ctx.config

    @property
    def options(self):
        """An added stage's section in this run's config (None when absent)."""
        return self.config.stage_section(self.name)

    @property
    def storage(self) -> Storage:
        return self.ctx.storage

    @property
    def folder(self) -> str:
        return self.ctx.stage_dir(self.name)

    def part_uri(self, index: int, prefix: str = "part") -> str:
        return join(self.folder, part_name(index, prefix))

    def __call__(self, payload) -> dict[str, pa.Table]:
        """What a worker runs: setup once per copy of the stage, then process."""
        if not getattr(self, "_set_up", False):
            self.setup()
            self._set_up = True
        return self.process(payload)

    @classmethod
    def code(cls) -> str:
        """The code part of the fingerprints: the stage module and everything of ours it imports."""
        return code_fingerprint(cls.__module__)

    def plan(self, inputs: dict[str, StageResult]) -> list[PartitionJob]:
        """The stage's partitions as jobs: fingerprinted, and marked for redo where they recorded failures."""
        code = self.code()
        jobs = []
        for index, partition in enumerate(self.partitions(inputs)):
            fp = fingerprint(self.name, code, partition.key)
            redo = self._failures_recorded(index, fp) > 0
            jobs.append(PartitionJob(index, fp, self.redo_payload(partition.payload, index) if redo else partition.payload, redo))
        if any(j.redo for j in jobs):
            log.info("%s: %d partitions recorded failures a rerun can fix; redoing what failed", self.name, sum(j.redo for j in jobs))
        return jobs

    def run(self, inputs: dict[str, StageResult]) -> StageResult:
        """Plan, compute what is not done (pipeline/executor.py), finish; the result later stages read."""
        ctx = self.ctx
        if not self.enabled():
            return StageResult(run_stage(self.name, ctx.run_dir, [], self, ctx.storage, progress=False), None)
        jobs = self.plan(inputs)
        resources = self.resources()
        pool = None
        if isinstance(resources, Actors):
            has_fallback = type(self).failed is not Stage.failed
            pool = ActorPool(self._actor_copy, resources.count, resources.resources, on_failure=self.failed if has_fallback else None)
        report = run_stage(self.name, ctx.run_dir, jobs, self, ctx.storage, num_cpus=getattr(resources, "num_cpus", 1),
                           progress=ctx.progress, marker=self.marker, pool=pool, outputs=self.external_outputs(),
                           schemas=self.outputs)
        self.finish(report, inputs)
        return StageResult(report, [with_failures(j.fingerprint, self._failures_recorded(j.index, j.fingerprint)) for j in jobs])

    def _actor_copy(self) -> Stage:
        return self

    def _failures_recorded(self, index: int, fp: str) -> int:
        if type(self).recorded_failures is Stage.recorded_failures:
            return 0
        if read_fingerprint(self.storage, self.part_uri(index)) != fp:
            return 0
        return self.recorded_failures(index)


def with_failures(fp: str, failures: int) -> str:
    """The fingerprint later stages see: it changes whenever a rerun fixes some of the failures."""
    return f"{fp}~{failures}-failed" if failures else fp


def _import_stage_modules() -> None:
    import pipeline

    for info in pkgutil.iter_modules(pipeline.__path__):
        if info.ispkg and importlib.util.find_spec(f"pipeline.{info.name}.stage") is not None:
            importlib.import_module(f"pipeline.{info.name}.stage")
    load_stage_plugins()


def registered() -> list[type[Stage]]:
    """Every stage, each after the stages it needs (ties in name order: a stable order)."""
    _import_stage_modules()
    stages = dict(STAGES)
    for cls in stages.values():
        missing = [n for n in cls.needs if n not in stages]
        if missing:
            raise TypeError(f"stage {cls.name} needs {missing}, which no stage module defines")
    order: list[type[Stage]] = []
    placed: set[str] = set()
    while len(order) < len(stages):
        ready = sorted(n for n, c in stages.items() if n not in placed and all(d in placed for d in c.needs))
        if not ready:
            raise TypeError(f"stages need each other in a circle: {sorted(set(stages) - placed)}")
        order.append(stages[ready[0]])
        placed.add(ready[0])
    return order


def stages_for(config: RunConfig) -> list[type[Stage]]:
    """The stages of a run with this config, in order: every built-in stage (one that is off still
    runs, to clear what an earlier attempt wrote), and each added stage whose section it has."""
    chosen = [cls for cls in registered() if cls.section is None or config.stage_section(cls.name) is not None]
    names = {cls.name for cls in chosen}
    for cls in chosen:
        absent = [n for n in cls.needs if n not in names]
        if absent:
            raise ValueError(f"stage {cls.name} needs {absent}: add their sections to the run config")
    return chosen
