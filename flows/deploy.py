"""Prefect deployments of build_dataset, one per run config: `localcap deploy` and `localcap serve`.

`deploy` registers each config with the Prefect API (PREFECT_API_URL) as deployment
`build_dataset/<run.name>`: its parameters are the config, its schedule `deploy.cron`, its work pool
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
ENTRYPOINT = "flows/build.py:build_dataset"


def _options(cfg: RunConfig) -> dict:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    schedule = {}
    if cfg.deploy.cron:
        from prefect.schedules import Cron

        schedule = {"schedules": [Cron(cfg.deploy.cron, timezone=cfg.deploy.timezone)]}
    return {
        "name": cfg.run.name,
        "parameters": {"config": cfg.model_dump(mode="json"), "progress": False},
        "concurrency_limit": ConcurrencyLimitConfig(limit=cfg.deploy.concurrency, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        "tags": ["localcap", cfg.run.name],
        "description": f"Build dataset {cfg.run.name} into {cfg.shards.output}",
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


def deploy(configs: list[RunConfig], pool: str | None = None) -> list[UUID]:
    """Register one build_dataset deployment per config; their ids."""
    from prefect import Flow

    ids = []
    for cfg in configs:
        work_pool = pool or cfg.deploy.work_pool
        ensure_process_pool(work_pool)
        flow = Flow.from_source(source=str(REPO), entrypoint=ENTRYPOINT)
        ids.append(flow.deploy(work_pool_name=work_pool, build=False, push=False, print_next_steps=False, **_options(cfg)))
    return ids


def serve(configs: list[RunConfig]) -> None:
    """Run the deployments of these configs from this process until interrupted."""
    from prefect import serve as prefect_serve

    from flows.build import build_dataset

    prefect_serve(*(build_dataset.to_deployment(**_options(cfg)) for cfg in configs))
