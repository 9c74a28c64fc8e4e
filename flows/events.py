"""The Prefect events localcap emits, so that automations can react to them (a new dataset version
starts a training run: `deploy.retrain: on_publish`, flows/deploy.py).

| event | resource | payload |
|---|---|---|
| `localcap.dataset.published` | `localcap.dataset.<publish.to>` | version, uri (NAME/vN), name, samples and shards (of the whole snapshot), added, removed, latest |
| `localcap.build.completed` | `localcap.dataset.<shards.output>` | run_id, samples, shards, inputs, rejected; published (the version made, or null) and not_published (why not) |
| `localcap.stage.failed` | `localcap.run.<run id>` | stage, reason |
| `localcap.train.completed` | `localcap.training.<run name>` | dataset (the version trained on), step, checkpoint, metrics |

Events go to the Prefect API of the process (PREFECT_API_URL, or the temporary server of a local
run); inside a flow run Prefect relates them to the run. Emitting never fails the work it reports on.
"""

from __future__ import annotations

import logging

DATASET_PUBLISHED = "localcap.dataset.published"
BUILD_COMPLETED = "localcap.build.completed"
STAGE_FAILED = "localcap.stage.failed"
TRAIN_COMPLETED = "localcap.train.completed"

log = logging.getLogger(__name__)


def dataset_resource_id(uri: str) -> str:
    """The resource id of a dataset: its published name (publish.to) or its built folder."""
    return f"localcap.dataset.{uri.rstrip('/')}"


def emit(event: str, resource_id: str, name: str, payload: dict, related: list[dict] | None = None) -> None:
    from prefect.events import emit_event

    try:
        emit_event(event=event, resource={"prefect.resource.id": resource_id, "prefect.resource.name": name},
                   payload=payload, related=related or [])
    except Exception as exc:  # an event is news about the work, never a reason for it to fail
        log.warning("could not emit %s: %s: %s", event, type(exc).__name__, exc)


def published(name_uri: str, result: dict, dataset: dict | None = None) -> None:
    """A new version: its counts are the snapshot's (the whole dataset), with what it added and removed."""
    emit(DATASET_PUBLISHED, dataset_resource_id(name_uri), name_uri.rstrip("/").rsplit("/", 1)[-1],
         {"version": result["version"], "uri": result["uri"], "name": name_uri, "latest": result["latest"],
          "samples": result.get("samples"), "shards": result.get("shards"), "added": result.get("added", 0),
          "removed": result.get("removed", 0)})


def build_completed(output: str, run_id: str, dataset: dict) -> None:
    c = dataset["counts"]
    p = dataset.get("published") or {}
    why = p.get("reason") if p.get("unchanged") else None if p else "publish.to is not set"
    emit(BUILD_COMPLETED, dataset_resource_id(output), output.rstrip("/").rsplit("/", 1)[-1],
         {"run_id": run_id, "samples": c["samples"], "shards": c["shards"], "inputs": c["inputs"], "rejected": c["rejected"],
          "published": None if why else p.get("uri"), "not_published": why})


def stage_failed(run_id: str, stage: str, reason: str) -> None:
    emit(STAGE_FAILED, f"localcap.run.{run_id}", run_id, {"stage": stage, "reason": reason})


def train_completed(result: dict) -> None:
    m = result.get("metrics", {})
    emit(TRAIN_COMPLETED, f"localcap.training.{result['name']}", result["name"],
         {"dataset": result["dataset"], "step": m.get("step"), "checkpoint": result.get("checkpoint"),
          "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}},
         related=[{"prefect.resource.id": dataset_resource_id(result["dataset"]), "prefect.resource.role": "dataset"}])


def flush(timeout: float = 10.0) -> None:
    """Send what is queued (a CLI process exits right after publishing)."""
    try:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout)
    except Exception as exc:
        log.warning("events not flushed: %s: %s", type(exc).__name__, exc)
