"""The `train` flow (Ray underneath) and `end_to_end` (build, publish, then train on the new version).

`train` is one coarse Prefect task around pipeline.train.runner: Ray (Ray Train for DDP, a Ray task
for one worker) owns the workers, the checkpoints and the restarts; Prefect tracks the run and keeps its metrics as an artifact. Rerunning
with the same run name resumes from the run's last checkpoint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import asdict

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE

from flows import events
from tqdm.auto import tqdm

from flows.build import build_dataset, build_run_name, run_config_of, run_id_for, slug
from pipeline import verbose
from pipeline.executor import init_ray
from pipeline.storage import Storage
from pipeline.train.evaluate import recall_keys
from pipeline.train.runner import run_training
from schemas.config import (
    RaySection,
    RunConfig,
    StorageSection,
    parse_train_config,
)


def run_logs_only(run_logger) -> logging.LoggerAdapter:
    """The run's logger without the terminal: lines for the run's Prefect logs (the UI) only."""
    from prefect.logging.handlers import APILogHandler

    base = logging.getLogger("localcap.run_logs_only")
    if not base.handlers:
        base.addHandler(APILogHandler())
        base.setLevel(logging.INFO)
        base.propagate = False
    return logging.LoggerAdapter(base, dict(run_logger.extra))


STEP = re.compile(r"^step (\d+)/(\d+)")


def progress_reporter(run_logger, bar: bool) -> Callable[[str], None]:
    """Where training's progress lines go: every line to the run's Prefect logs; in the terminal the
    others (resumed from, held-out metrics) and, for the step lines, a progress bar (with `bar`),
    or every line with --verbose."""
    quiet = None if verbose() else run_logs_only(run_logger)
    state: dict = {}

    def report(line: str) -> None:
        m = STEP.match(line)
        (quiet if m and quiet else run_logger).info(line)
        if bar and m:
            step, total = int(m[1]), int(m[2])
            if "bar" not in state:
                state["bar"] = tqdm(total=total, desc="train", unit="step", initial=step - 1)
            state["bar"].set_postfix_str(line.split(" ", 2)[2].split(" (")[0], refresh=False)
            state["bar"].update(step - state["bar"].n)
            if step >= total:
                state["bar"].close()

    return report


@task(name="train", cache_policy=NO_CACHE)
def train_task(dataset_uri: str, train_config: dict, storage: dict, progress: bool = False) -> dict:
    section = StorageSection(**storage)
    # The loss every 10 steps, checkpoints and held-out metrics, in the run's Prefect logs.
    result = run_training(dataset_uri, parse_train_config(train_config), Storage(section.endpoint_url, section.region),
                          on_progress=progress_reporter(get_run_logger(), progress))
    return asdict(result)


def _rounded(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metrics_markdown(result: dict) -> str:
    m = result["metrics"]
    lines = [f"# localcap training `{result['name']}`", "",
             f"Dataset `{result['dataset']}`, objective `{m.get('objective')}`: step {m.get('step')} "
             f"({m.get('steps_this_run')} this run{', resumed from step %s' % m['resumed_from'] if m.get('resumed_from') else ''}).",
             f"Loss {_rounded(m.get('first_loss'))} over the first steps, {_rounded(m.get('last_loss'))} over the last.",
             f"Checkpoint: `{result['checkpoint']}`", ""]
    recalls = recall_keys(m)
    if recalls:
        lines += ["| held-out retrieval | recall | chance |", "|---|---|---|"]
        lines += [f"| {k} | {m[k]:.3f} | {m[k + '_chance']:.3f} |" for k in recalls]
    if m.get("eval_loss") is not None:
        lines += [f"Held-out MAE loss: {m['eval_loss']:.4f} on {m['eval_images']} images."]
    if m.get("eval_on_train"):
        lines += ["", "**Evaluated on training shards**: the dataset has too few shards to hold any out."]
    return "\n".join(lines)


def train_run_name() -> str:
    """`<dataset>-<version>` (scenes-v3), or `train-<folder>` for a built folder: which data this run trains on."""
    from prefect.runtime import flow_run

    parts = [p for p in str(flow_run.parameters.get("dataset_uri", "")).rstrip("/").split("/") if p]
    if len(parts) >= 2 and (parts[-1] == "LATEST" or parts[-1][:1] == "v" and parts[-1][1:].isdigit()):
        return f"{parts[-2]}-{parts[-1]}"
    return f"train-{parts[-1]}" if parts else "train"


@flow(name="train", log_prints=True, flow_run_name=train_run_name)
def train(dataset_uri: str, train_config: dict, storage: dict | None = None, ray: dict | None = None,
          progress: bool = False) -> dict:
    """Train on a dataset (directory, NAME/vN, NAME/LATEST or NAME; path or s3://); returns the run's
    name, output, checkpoint and metrics (also in OUTPUT/NAME/metrics.json)."""
    cfg = parse_train_config(train_config)
    logger = get_run_logger()
    init_ray(RaySection(**(ray or {})))
    logger.info("training %s on %s (%d worker(s), %s)", cfg.objective, dataset_uri, cfg.num_workers, "GPU" if cfg.use_gpu else "CPU")
    result = train_task(dataset_uri, cfg.model_dump(mode="json"), storage or {}, progress)
    create_markdown_artifact(metrics_markdown(result), key=f"localcap-train-{slug(result['name'])}",
                             description=f"localcap training {result['name']}")
    logger.info("trained %s: checkpoint %s", result["name"], result["checkpoint"])
    events.train_completed(result)
    return result


@flow(name="end_to_end", log_prints=True, flow_run_name=build_run_name)
def end_to_end(config: str | dict | RunConfig, run_id: str | None = None, overrides: dict | None = None,
               paths_from: str | None = None, progress: bool = True) -> dict:
    """build_dataset, then train on what it made: the published version when publish.to is set
    (NAME/vN, exactly the version just published), else the built folder. `config` as for build_dataset."""
    from prefect import tags
    from prefect.runtime import flow_run

    cfg = run_config_of(config, overrides, paths_from)
    with tags(*(flow_run.tags or [])):  # the subflows carry the deployment's tags, as their parent does
        # This flow run's id, not the subflow's: Prefect's Retry of end_to_end resumes the same build.
        dataset = build_dataset(cfg, run_id=run_id_for(run_id), progress=progress)
        published = dataset.get("published")
        if published and published.get("unchanged"):
            get_run_logger().info("no new version (%s): nothing new to train on", published["reason"])
            return {"dataset": dataset, "train": None}
        if not published and not dataset["counts"]["samples"]:
            get_run_logger().info("the build has no samples: nothing to train on")
            return {"dataset": dataset, "train": None}
        uri = published["uri"] if published else cfg.shards.output
        trained = train(uri, cfg.train.model_dump(mode="json"), cfg.storage.model_dump(mode="json"), cfg.ray.model_dump(mode="json"),
                        progress=progress)
    return {"dataset": dataset, "train": trained}
