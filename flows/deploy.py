"""Prefect deployments, three per run config: `localcap deploy` and `localcap serve`.

`deploy` registers each config with the Prefect API (PREFECT_API_URL) as deployments
`build_dataset/<run.name>`, `end_to_end/<run.name>` (build, publish, train on the new version) and
`train/<run.name>` (train on publish.to's LATEST, or shards.output). Their parameters come from the
config; the schedule `deploy.cron` goes to the flow `deploy.flow` names (default build_dataset; the
others run when triggered, e.g. `prefect deployment run end_to_end/NAME`); their work pool
`deploy.work_pool` (a process pool, created if missing: start workers with `prefect worker start
--pool localcap`), and a deployment concurrency limit (`deploy.concurrency`, default 1, extra runs
wait in line) so two scheduled builds of one dataset never overlap. The code is loaded from this
checkout (`flow.from_source`), so workers on the same machine or a shared file system run it as is;
for Docker or Kubernetes pools build an image with the package (infra/) and pass it to Prefect.

`serve` runs the same deployments from one long-lived process, no work pool or worker needed.
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from schemas.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINTS = {"build_dataset": "flows/build.py:build_dataset", "end_to_end": "flows/train.py:end_to_end",
               "train": "flows/train.py:train"}


def _parameters(flow_name: str, cfg: RunConfig) -> dict:
    config = cfg.model_dump(mode="json")
    if flow_name == "train":
        return {"dataset_uri": cfg.publish.to or cfg.shards.output, "train_config": config["train"],
                "storage": config["storage"], "ray": config["ray"]}
    return {"config": config, "progress": False}


def _descriptions(cfg: RunConfig) -> dict:
    data = cfg.publish.to or cfg.shards.output
    return {"build_dataset": f"Build dataset {cfg.run.name} into {cfg.shards.output}",
            "end_to_end": f"Build dataset {cfg.run.name}, publish it, then train on the new version",
            "train": f"Train ({cfg.train.objective}) on {data}"}


def _options(flow_name: str, cfg: RunConfig) -> dict:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    schedule = {}
    if cfg.deploy.cron and flow_name == cfg.deploy.flow:
        from prefect.schedules import Cron

        schedule = {"schedules": [Cron(cfg.deploy.cron, timezone=cfg.deploy.timezone)]}
    return {
        "name": cfg.run.name,
        "parameters": _parameters(flow_name, cfg),
        "concurrency_limit": ConcurrencyLimitConfig(limit=cfg.deploy.concurrency, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        "tags": ["localcap", cfg.run.name],
        "description": _descriptions(cfg)[flow_name],
        **schedule,
    }


def ensure_process_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy(configs: list[RunConfig], pool: str | None = None) -> list[dict[str, UUID]]:
    """Register the build_dataset, end_to_end and train deployments of each config; per config,
    {flow name: deployment id}."""
    from prefect import Flow

    ids = []
    for cfg in configs:
        work_pool = pool or cfg.deploy.work_pool
        ensure_process_pool(work_pool)
        ids.append({name: Flow.from_source(source=str(REPO), entrypoint=entrypoint).deploy(
            work_pool_name=work_pool, build=False, push=False, print_next_steps=False, **_options(name, cfg))
            for name, entrypoint in ENTRYPOINTS.items()})
    return ids


def serve(configs: list[RunConfig]) -> None:
    """Run the deployments of these configs from this process until interrupted."""
    from prefect import serve as prefect_serve

    from flows.build import build_dataset
    from flows.train import end_to_end, train

    flows = {"build_dataset": build_dataset, "end_to_end": end_to_end, "train": train}
    prefect_serve(*(flow.to_deployment(**_options(name, cfg)) for cfg in configs for name, flow in flows.items()))
