"""A scaling sweep on Ray Tune: plan the trials, run the unfinished ones, fit the laws, write the folder.

Each trial is a Tune function trainable that calls the ordinary training (pipeline.train.runner: one
Ray task for a single worker, Ray Train's TorchTrainer for more; its checkpoints, the held-out metrics
and the probe) with the trial's train config; the trial asks Tune for no CPU itself (one byte of
memory: Tune wants some resource), its training workers ask for theirs (train.num_workers x
cpus_per_worker, GPUs with use_gpu), so the cluster's size sets how many trials run at once.

The sweep folder OUTPUT/NAME/ is its own ledger: trials/ID/ holds a trial's checkpoints (a killed
trial resumes from its last one) and, once it ends, result.json; a rerun skips every trial whose
result.json says finished. A trial's id carries a digest of its train config, so a changed config is a
new trial, never a stale result. At the end: results.parquet (schemas.sweep.TRIAL_SCHEMA), fit.json,
the plots and index.html.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.storage import Storage, join
from schemas.sweep import TRIAL_SCHEMA, SweepConfig, TrialPoint, trial_config, trial_id
from schemas.train import TrainConfig

log = logging.getLogger("localcap")
RESULT = "result.json"
FINISHED, ERROR, PENDING = "finished", "error", "pending"


@dataclass(frozen=True)
class Trial:
    id: str
    point: TrialPoint
    train: TrainConfig  # output = the sweep's trials/ folder, name = id


@dataclass
class SweepResult:
    folder: str
    rows: list[dict]
    fit: dict
    page: str  # index.html's URI
    ran: int  # trials run this time (the rest had finished before)


def plan(sweep: SweepConfig, folder: str) -> list[Trial]:
    """Every trial of the sweep, in grid order, with its train config."""
    trials = []
    for point in sweep.points():
        cfg = trial_config(sweep, point)
        tid = trial_id(point, cfg)
        trials.append(Trial(tid, point, cfg.model_copy(update={"output": join(folder, "trials"), "name": tid})))
    return trials


def preflight(sweep: SweepConfig, storage: Storage) -> None:
    """What would fail every trial alike, refused before any starts: a dataset that is not there, a
    grid asking for more training images than it holds, local_contrastive on a dataset without captions."""
    from pipeline.preflight import BucketProbe, check_writable
    from pipeline.shards.loader import ShardDataset
    from pipeline.storage import is_s3
    from pipeline.train.runner import training_images

    buckets = BucketProbe(storage.endpoint_url, storage.region)  # one quick look: a dead endpoint is one line, not minutes
    if is_s3(sweep.dataset):
        buckets.check(sweep.dataset, "dataset")
    check_writable(sweep.output, "output", buckets)
    try:
        dataset = ShardDataset(sweep.dataset, decode=False, storage=storage)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"sweep dataset: {exc}") from None
    available = training_images(dataset, sweep.train.data.holdout_shards)
    largest = max(p.images for p in sweep.points())
    if largest > available:
        raise ValueError(f"the sweep asks for up to {largest} training images but {dataset.root} has {available} "
                         f"(after holding out {sweep.train.data.holdout_shards} shard(s)): lower grid.images or use a larger version")
    if not dataset.captioned and any(p.objective == "local_contrastive" for p in sweep.points()):
        raise ValueError(f"{dataset.root} was built without captions: local_contrastive trials cannot train on it (use objective mae)")


def read_result(storage: Storage, folder: str, tid: str) -> dict | None:
    """A trial's result.json, or None when it has none or it is unreadable (then the trial runs again)."""
    uri = join(folder, "trials", tid, RESULT)
    if not storage.exists(uri):
        return None
    try:
        result = json.loads(storage.read_bytes(uri))
    except ValueError:
        log.warning("%s is not valid JSON: the trial runs again", uri)
        return None
    return result if isinstance(result, dict) and result.get("trial_id") == tid else None


def result_row(trial: Trial, status: str, metrics: dict, metric: str, seconds: float | None = None, error: str | None = None) -> dict:
    """One row of results.parquet (TRIAL_SCHEMA)."""
    def number(key):
        value = metrics.get(key)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    p = trial.point
    return {"trial_id": trial.id, "objective": p.objective, "model": p.model, "images": p.images, "resolution": p.resolution,
            "steps": trial.train.steps, "status": status, "metric": number(metric), "probe_acc": number("probe_acc"),
            "probe_chance": number("probe_chance"), "probe_acc_init": number("probe_acc_init"), "last_loss": number("last_loss"),
            "params": int(metrics["params"]) if isinstance(metrics.get("params"), int) else None,
            "seconds": seconds, "checkpoint": metrics.get("checkpoint"), "error": error,
            "metrics_json": json.dumps(metrics, default=str, sort_keys=True)}


def run_trial(config: dict) -> None:
    """Tune's function trainable: one training run; reports once, at its end, whether it failed or not."""
    from ray import tune

    from pipeline.train.runner import run_training

    started = time.perf_counter()
    try:
        result = run_training(config["dataset"], TrainConfig.model_validate(config["train"]),
                              Storage(config["storage"].get("endpoint_url"), config["storage"].get("region")))
        report = {"status": FINISHED, "metrics": result.metrics}
    except Exception as exc:  # recorded in the trial's result.json; a rerun of the sweep tries it again
        report = {"status": ERROR, "error": f"{type(exc).__name__}: {exc}"[:2000], "metrics": {}}
    tune.report({"sweep_trial": config["trial_id"], "seconds": time.perf_counter() - started, "report": json.dumps(report, default=str)})


def _ledger(storage: Storage, folder: str, by_id: dict[str, Trial], metric: str, on_trial: Callable[[dict], None]):
    """A Tune callback (it runs in this process) that writes each trial's result.json as soon as it reports."""
    from ray.tune import Callback

    class Ledger(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            tid = result.get("sweep_trial")  # Tune's own "trial_id" is another id
            if tid not in by_id:
                return
            report = json.loads(result["report"])
            row = result_row(by_id[tid], report["status"], report["metrics"], metric, result.get("seconds"), report.get("error"))
            storage.write_bytes(join(folder, "trials", tid, RESULT), json.dumps(row, indent=1).encode())
            if self.on_trial is not None:
                self.on_trial(row)

        def __getstate__(self):  # Tune pickles its callbacks for a later restore; the listener stays here
            return self.__dict__ | {"on_trial": None}

    ledger = Ledger()
    ledger.on_trial = on_trial
    return ledger


def concurrent_trials(sweep: SweepConfig) -> int:
    """How many trials fit on the cluster at once (sweep.max_concurrent_trials wins)."""
    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    import ray

    total = ray.cluster_resources()
    t = sweep.train
    fits = total.get("GPU", 0) // t.num_workers if t.use_gpu else total.get("CPU", 1) // (t.num_workers * t.cpus_per_worker)
    return max(1, int(fits))


def run_trials(sweep: SweepConfig, folder: str, todo: list[Trial], storage: Storage, on_trial: Callable[[dict], None]) -> None:
    """Run `todo` as Ray Tune trials (Ray must be up)."""
    from ray import tune

    from pipeline.train.runner import ray_storage

    by_id = {t.id: t for t in todo}
    space = [{"trial_id": t.id, "dataset": sweep.dataset, "train": t.train.model_dump(mode="json"),
              "storage": sweep.storage.model_dump(mode="json")} for t in todo]
    storage_path, filesystem = ray_storage(join(folder, "tune"), storage)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"memory": 1}),
        param_space=tune.grid_search(space),
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_trials(sweep), trial_dirname_creator=lambda t: t.config["trial_id"],
                                    trial_name_creator=lambda t: t.config["trial_id"]),
        run_config=tune.RunConfig(name=f"run-{time.strftime('%Y%m%dT%H%M%S')}", storage_path=storage_path, storage_filesystem=filesystem,
                                  callbacks=[_ledger(storage, folder, by_id, sweep.metric, on_trial)], verbose=0),
    )
    tuner.fit()


def write_outputs(sweep: SweepConfig, folder: str, rows: list[dict], storage: Storage) -> tuple[dict, str]:
    """results.parquet, fit.json, the plots and index.html; (the fit, index.html's URI)."""
    import io

    from pipeline.sweep.fit import fit_sweep
    from pipeline.sweep.report import plot_files, sweep_page

    table = pa.Table.from_pylist(rows, schema=TRIAL_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(join(folder, "results.parquet"), buffer.getvalue())
    fit = fit_sweep(rows, sweep.metric, target=sweep.fit.target, laws=tuple(sweep.fit.laws), bootstrap=sweep.fit.bootstrap, seed=sweep.fit.seed)
    storage.write_bytes(join(folder, "fit.json"), json.dumps(fit, indent=1, allow_nan=False).encode())
    plots = plot_files(rows, fit, sweep.metric)
    for name, data in plots.items():
        storage.write_bytes(join(folder, name), data)
    config_yaml = yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False)
    page = join(folder, "index.html")
    storage.write_bytes(page, sweep_page(f"localcap sweep {sweep.name}", rows, fit, sweep.metric, sorted(plots), config_yaml).encode())
    return fit, page


def run_sweep(sweep: SweepConfig, storage: Storage | None = None, on_trial: Callable[[dict], None] | None = None,
              log_line: Callable[[str], None] = print) -> SweepResult:
    """Run a sweep to its end (Ray must be up): the unfinished trials, then the fit and the outputs."""
    storage = storage or Storage()
    preflight(sweep, storage)
    folder = join(sweep.output, sweep.name)
    trials = plan(sweep, folder)
    done = {t.id: r for t in trials if (r := read_result(storage, folder, t.id)) and r.get("status") == FINISHED}
    todo = [t for t in trials if t.id not in done]
    log_line(f"sweep {sweep.name}: {len(trials)} trials, {len(done)} finished before, {len(todo)} to run -> {folder}")
    counter = {"n": 0}

    def reported(row: dict) -> None:
        counter["n"] += 1
        figure = f"{sweep.metric} {row['metric']:.4f}" if row["metric"] is not None else row["error"] or "no metric"
        log_line(f"trial {counter['n']}/{len(todo)} {row['trial_id']}: {row['status']}, {figure} ({row['seconds'] or 0:.0f} s)")
        if on_trial:
            on_trial(row)

    if todo:
        run_trials(sweep, folder, todo, storage, reported)
    rows = []
    for t in trials:
        row = done.get(t.id) or read_result(storage, folder, t.id)
        rows.append(row or result_row(t, PENDING, {}, sweep.metric, error="did not report (killed, or Tune lost it)"))
    fit, page = write_outputs(sweep, folder, rows, storage)
    return SweepResult(folder, rows, fit, page, len(todo))
