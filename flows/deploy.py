"""Prefect deployments, three per run config: `localcap deploy` and `localcap serve`.

`deploy` registers each config with the Prefect API (PREFECT_API_URL) as deployments
`build_dataset/<run.name>`, `end_to_end/<run.name>` (build, publish, train on the new version) and
`train/<run.name>` (train on publish.to's LATEST, or shards.output). The build deployments' parameters
are a form of a few fields: the config file (read when a run starts: edit it and the next run uses
it; redeploy for a new schedule or trigger), its --set overrides and the folder its relative paths
are relative to; a config built in Python goes in whole. The schedule (`deploy.cron` + `deploy.timezone`, or every `deploy.interval_s` seconds) goes to
the flow `deploy.flow` names (default build_dataset; the others run when triggered, e.g. `prefect
deployment run end_to_end/NAME`, and a redeploy clears a schedule they had); their work pool
`deploy.work_pool` (a process pool, created if missing: start workers with `prefect worker start
--pool localcap`), and a deployment concurrency limit (`deploy.concurrency`, default 1, extra runs
wait in line) so two scheduled builds of one dataset never overlap; the train deployment runs one
at a time, and with `deploy.retrain: on_publish` a trigger starts it on each new version of
publish.to (its `localcap.dataset.published` event, flows/events.py). The code is loaded from this
checkout (`flow.from_source`), so workers on the same machine or a shared file system run it as is;
for Docker or Kubernetes pools build an image with the package (infra/) and pass it to Prefect.

A flow run of a deployment starts in the checkout (Prefect's pull step), not where `localcap deploy`
ran, so every relative path of the config is taken against the deploying process's working
directory (`paths_from`; a config passed whole has them made absolute before it becomes a
parameter). The working directory of the run then does not matter.

The server's scheduler needs SQLAlchemy < 2.1 (pyproject.toml): with 2.1 it fails on every loop
and schedules create no runs, though the UI shows them active.

`serve` runs the same deployments from one long-lived process, no work pool or worker needed.
"""

from __future__ import annotations

import contextlib
import io

import os
from datetime import timedelta
from pathlib import Path
from uuid import UUID

from pipeline.preflight import untrainable
from schemas.config import RunConfig, with_absolute_paths

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINTS = {"build_dataset": "flows/build.py:build_dataset", "end_to_end": "flows/train.py:end_to_end",
               "train": "flows/train.py:train"}


def _parameters(flow_name: str, cfg: RunConfig) -> dict:
    """A form of a few fields in the Prefect UI: the config file, its overrides and the folder its
    relative paths are relative to (the flow reads the file when it runs), when the config came from a
    file unchanged; else the whole config."""
    origin = cfg.origin
    cfg = with_absolute_paths(cfg, os.getcwd())  # idempotent: the run's own working directory must not matter
    config = cfg.model_dump(mode="json")
    if flow_name == "train":
        return {"dataset_uri": cfg.publish.to or cfg.shards.output, "train_config": config["train"],
                "storage": config["storage"], "ray": config["ray"]}
    if origin and _reads_back(origin, cfg):
        return {"config": origin["path"], "overrides": origin["overrides"], "paths_from": origin["paths_from"], "progress": False}
    return {"config": config, "progress": False}


def _reads_back(origin: dict, cfg: RunConfig) -> bool:
    """Whether loading the file again gives this config (not so once it was changed in Python)."""
    from schemas.config import load_config

    try:
        again = load_config(origin["path"], origin["overrides"], base=origin["paths_from"])
    except ValueError:
        return False
    return again.model_dump(mode="json") == cfg.model_dump(mode="json")


def _descriptions(cfg: RunConfig) -> dict:
    data = cfg.publish.to or cfg.shards.output
    return {"build_dataset": f"Build dataset {cfg.run.name} into {cfg.shards.output}",
            "end_to_end": f"Build dataset {cfg.run.name}, publish it, then train on the new version",
            "train": f"Train ({cfg.train.objective}) on {data}"}


def _options(flow_name: str, cfg: RunConfig) -> dict:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    if flow_name == "train":  # one training run of a dataset at a time
        strategy = ConcurrencyLimitStrategy.CANCEL_NEW if cfg.deploy.retrain_when_busy == "skip" else ConcurrencyLimitStrategy.ENQUEUE
        limit = ConcurrencyLimitConfig(limit=1, collision_strategy=strategy)
    else:
        limit = ConcurrencyLimitConfig(limit=cfg.deploy.concurrency, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    return {
        "name": cfg.run.name,
        "parameters": _parameters(flow_name, cfg),
        "concurrency_limit": limit,
        "tags": ["localcap", cfg.run.name],
        "description": _descriptions(cfg)[flow_name],
        # Always passed, [] included: redeploying with another deploy.flow (or no schedule) removes the old one.
        "schedules": _schedules(flow_name, cfg),
        # Always passed too: a redeploy without deploy.retrain removes the trigger.
        "triggers": _triggers(flow_name, cfg),
    }


def _triggers(flow_name: str, cfg: RunConfig) -> list:
    """deploy.retrain on_publish: the train deployment runs on each version of publish.to as its
    `localcap.dataset.published` event names it (the version itself, not LATEST when the worker looks)."""
    from prefect.events import DeploymentEventTrigger

    from flows.events import DATASET_PUBLISHED, dataset_resource_id

    if flow_name != "train" or cfg.deploy.retrain != "on_publish":
        return []
    return [DeploymentEventTrigger(
        name=f"retrain {cfg.run.name} on each published version",
        description=f"Runs the deployment train/{cfg.run.name} on each new version of {cfg.publish.to} "
                    "(the localcap.dataset.published event `localcap publish` and the build send).",
        expect={DATASET_PUBLISHED},
        match={"prefect.resource.id": dataset_resource_id(cfg.publish.to)},
        parameters={"dataset_uri": "{{ event.payload.uri }}"},
    )]


def check_deployable(cfg: RunConfig) -> None:
    """Refuse, in one line, a config whose scheduled or triggered runs would fail every time: a
    training it starts by itself (deploy.flow train or end_to_end, deploy.retrain) on data it cannot
    train on, or a retrain trigger without a published dataset."""
    if cfg.deploy.retrain == "on_publish" and not cfg.publish.to:
        raise ValueError(f"{cfg.run.name}: deploy.retrain: on_publish needs publish.to (the dataset whose new versions start training)")
    trains_by_itself = cfg.deploy.retrain != "none" or (cfg.deploy.scheduled and cfg.deploy.flow != "build_dataset")
    if trains_by_itself and (reason := untrainable(cfg)):
        raise ValueError(reason)


def _schedules(flow_name: str, cfg: RunConfig) -> list:
    """The schedule of `deploy.flow`'s deployment (cron or interval); [] for the others."""
    from prefect.schedules import Cron, Interval

    d = cfg.deploy
    if flow_name != d.flow or not d.scheduled:
        return []
    if d.cron:
        return [Cron(d.cron, timezone=d.timezone)]
    return [Interval(timedelta(seconds=d.interval_s), timezone=d.timezone)]


def schedule_text(flow_name: str, cfg: RunConfig) -> str:
    """How a deployment of this config runs, for the CLI: 'cron 0 3 * * * (UTC)', 'every 30 s', 'on demand'."""
    d = cfg.deploy
    if flow_name != d.flow or not d.scheduled:
        return "on demand"
    return f"cron {d.cron} ({d.timezone})" if d.cron else f"every {d.interval_s:g} s"


def ensure_process_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            except ObjectAlreadyExists:  # a worker started at the same time (`prefect worker start --type process`) made it
                pass


def deploy(configs: list[RunConfig], pool: str | None = None) -> list[dict[str, UUID]]:
    """Register the build_dataset, end_to_end and train deployments of each config; per config,
    {flow name: deployment id}."""
    from prefect import Flow

    from flows.environment import flow_run_env

    for cfg in configs:
        check_deployable(cfg)
    ids = []
    for cfg in configs:
        work_pool = pool or cfg.deploy.work_pool
        ensure_process_pool(work_pool)
        with contextlib.redirect_stdout(io.StringIO()):  # Prefect prints a table per deployment; the CLI prints one for all
            ids.append({name: Flow.from_source(source=str(REPO), entrypoint=entrypoint).deploy(
                work_pool_name=work_pool, build=False, push=False, print_next_steps=False, ignore_warnings=True,
                job_variables={"env": flow_run_env()}, **_options(name, cfg))
                for name, entrypoint in ENTRYPOINTS.items()})
    return ids


def trigger_text(flow_name: str, cfg: RunConfig) -> str:
    """What starts a deployment besides its schedule and a manual run, for the CLI's table."""
    if flow_name == "train" and cfg.deploy.retrain == "on_publish":
        return f"each new version of {cfg.publish.to}"
    return "-"


def serve(configs: list[RunConfig]) -> None:
    """Run the deployments of these configs from this process until interrupted."""
    from prefect import serve as prefect_serve

    from flows.build import build_dataset
    from flows.train import end_to_end, train

    for cfg in configs:
        check_deployable(cfg)
    flows = {"build_dataset": build_dataset, "end_to_end": end_to_end, "train": train}
    prefect_serve(*(flow.to_deployment(**_options(name, cfg)) for cfg in configs for name, flow in flows.items()))
