"""The settings every localcap process needs, in one place: the CLI applies them at start-up and
`localcap deploy` gives them to the flow runs a worker starts. A value already in the environment
wins (set RAY_AUTH_MODE=token for a Ray cluster with token authentication, say)."""

from __future__ import annotations

import os

DEFAULTS = {
    # Prefect's temporary server otherwise records a telemetry session on start-up, which can race its
    # own database migration on a fresh PREFECT_HOME ("database is locked") and logs an ERROR offline.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Its first start on a fresh PREFECT_HOME migrates a database: ~15 s on 2 idle cores, past Prefect's
    # 20 s default when the machine is busy. A slow start is better than a failed run.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # localcap's own log lines (warnings such as training's hold-out one) go to the run's Prefect logs too.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,captioners,dedupe,flows,schemas",
    # A local Ray without token authentication (and without its warning about it).
    "RAY_AUTH_MODE": "disabled",
}


def apply() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def flow_run_env() -> dict[str, str]:
    """What a worker's flow run gets (job variable `env`): these settings as this process has them."""
    return {key: os.environ.get(key, value) for key, value in DEFAULTS.items()}
