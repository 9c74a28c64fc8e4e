"""Deployments for data engineers, as the README's operations section runs them: a real Prefect server
(`prefect server start`, its scheduler on), `localcap deploy` in its own process, a process worker
(`prefect worker start`). One test triggers a build through the API; the other deploys a schedule and
waits for the server's scheduler to create the run, with relative paths in the config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers.config import run_config
from tests.helpers.images import scene_jpeg
from tests.helpers.postgres import postgres_server
from tests.helpers.prefect_home import prefect_home

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The server's scheduler, fast: look every second (default 60 s; the loop for just-updated
# deployments, default 5 s, too), and keep one future run per deployment (defaults: at least 3 runs
# and an hour ahead, at most 100), so that an interval of a few seconds yields a run at once and
# not a queue of them behind the concurrency limit.
FAST_SCHEDULER = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_SCHEDULED_TIME": "PT1S",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without its Prefect settings (the test harness's), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_AUTH_MODE="disabled", **extra)
    return env


def _stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to the process group (a worker's flow runs and their Ray included), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:  # something still tearing down is not what these tests are about
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@dataclass
class Server:
    url: str  # PREFECT_API_URL
    log: Path

    def scheduler_error(self) -> str:
        """The scheduler's failure (SQLAlchemy 2.1), which shows only in the server's log; '' when none."""
        text = self.log.read_text(errors="replace")
        return "" if SCHEDULER_FAILS not in text else text[max(0, text.index(SCHEDULER_FAILS) - 3000):][:4000]


SCHEDULER_FAILS = "Can't evaluate bulk DML statement"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    """`prefect server start` on a free port, on a PostgreSQL database of its own (the production
    set-up, infra/prefect/README.md; SQLite logs "database is locked" under a worker's load), with
    its own PREFECT_HOME and a fast scheduler, for this module's tests."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    with postgres_server() as database:
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                                    env=_env(Path(prefect_home(home / "home")), PREFECT_API_DATABASE_CONNECTION_URL=database,
                                             **FAST_SCHEDULER),
                                    cwd=home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180  # the first start migrates the database
            while True:
                assert proc.poll() is None, "prefect server start exited:\n" + _tail(log)
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "prefect server did not answer:\n" + _tail(log)
                time.sleep(0.5)
            yield Server(url, log)
        finally:
            _stop(proc)


def server_errors(log: Path) -> list[str]:
    """The server log's ERROR lines (and tracebacks): none on a healthy PostgreSQL-backed server."""
    return [line for line in log.read_text(errors="replace").splitlines() if "ERROR" in line or line.startswith("Traceback")]


@contextmanager
def _client(url: str):
    """A sync Prefect client of the server at `url` (this process's settings may name the test harness)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


def _start_worker(pool: str, url: str, tmp_path: Path) -> subprocess.Popen:
    # Poll every 2 s (default 10 s; every second makes Prefect's SQLite server report "database is
    # locked" twice as often). It runs each flow run in a subprocess of its own, in the checkout (the
    # deployment's pull step), whatever its own working directory.
    with open(tmp_path / "worker.log", "wb") as log:
        return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                                env=_env(tmp_path / "worker-home", PREFECT_API_URL=url, PREFECT_WORKER_QUERY_SECONDS="2"),
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _table(stdout: str) -> dict[str, list[str]]:
    """deployment -> [schedule, trigger, work pool] from `localcap deploy`'s table (columns two spaces or more apart)."""
    import re

    rows = [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip()]
    return {r[0]: r[1:] for r in rows if "/" in r[0] and len(r) == 4}


POOL = "localcap-test"  # one work pool and one process worker for the module (a worker's start costs seconds)


@pytest.fixture(scope="module")
def worker(server, tmp_path_factory) -> Path:
    """`prefect worker start` on POOL for this module's tests; its log. It creates the pool (a deploy
    after it finds the pool there)."""
    folder = tmp_path_factory.mktemp("prefect-worker")
    proc = _start_worker(POOL, server.url, folder)
    yield folder / "worker.log"
    _stop(proc, grace=5)  # no flow run is left to finish: a worker that takes longer to stop is killed


def _deploy(config_path: Path, url: str, home: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`localcap deploy CONFIG` in its own process, as a data engineer runs it."""
    return subprocess.run([str(BIN / "localcap"), "deploy", str(config_path)], env=_env(home, PREFECT_API_URL=url), cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def _wait_final(url: str, flow_run_id, deadline: float):
    with _client(url) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if (state is not None and state.is_final()) or time.monotonic() > deadline:
                return state
            time.sleep(1)


def _images(folder: Path, n: int = 2) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"{i}.jpg").write_bytes(scene_jpeg(1200 + i, 1300, 1100))


@pytest.mark.slow
def test_deploy_trigger_and_complete(server, worker, tmp_path):
    from prefect.deployments import run_deployment

    _images(tmp_path / "src")
    config = run_config(tmp_path, "src", name="nightly-scenes", regions={"method": "none"}, shards={"keep_empty": True},
                        ray={"num_cpus": 1}, deploy={"cron": "0 3 * * *", "work_pool": POOL})
    config_path = tmp_path / "nightly.yaml"
    config_path.write_text(yaml.safe_dump(config))

    out = _deploy(config_path, server.url, tmp_path / "client-home", cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    table = _table(out.stdout)
    assert table["build_dataset/nightly-scenes"] == ["cron 0 3 * * * (UTC)", "-", POOL], out.stdout
    assert "Successfully created" not in out.stdout and out.stdout.count("deployment") == 1  # one table, Prefect's own not printed

    with _client(server.url) as client:
        deployment = client.read_deployment_by_name("build_dataset/nightly-scenes")
        assert deployment.work_pool_name == POOL
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
        # A form of a few fields, not the whole config: the file (read when the run starts), its overrides,
        # the folder its relative paths are relative to.
        assert deployment.parameters == {"config": str(config_path), "overrides": {}, "paths_from": str(REPO), "progress": False}
        # The retrain deployments come with it, on demand (the cron belongs to deploy.flow, build_dataset).
        end_to_end = client.read_deployment_by_name("end_to_end/nightly-scenes")
        train = client.read_deployment_by_name("train/nightly-scenes")
        assert end_to_end.schedules == [] and train.schedules == []
        assert end_to_end.parameters == deployment.parameters
        assert train.parameters["dataset_uri"] == str(tmp_path / "ds")
        assert train.parameters["train_config"]["objective"] == "local_contrastive"
    assert table["end_to_end/nightly-scenes"] == ["on demand", "-", POOL] and table["train/nightly-scenes"] == ["on demand", "-", POOL]

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.url}):
        flow_run = run_deployment("build_dataset/nightly-scenes", timeout=0)  # triggered through the API
    state = _wait_final(server.url, flow_run.id, time.monotonic() + 420)
    assert state is not None and state.is_completed(), f"{state}\n" + _tail(worker)
    assert (tmp_path / "ds" / "dataset.json").exists()


@pytest.mark.slow
def test_scheduled_build_runs(server, worker, tmp_path):
    """The issue: a schedule that never made a run (the scheduler failed on SQLAlchemy 2.1) and relative
    paths that landed in the checkout. Here nothing triggers the run: the server's scheduler makes it
    from deploy.interval_s, a worker runs it in the checkout, and the dataset is where the config's
    relative path meant, beside the config's user."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    cwd = tmp_path / "engineer"  # where the data engineer runs `localcap deploy`
    _images(cwd / "incoming")
    config = {"run": {"name": "every-few-seconds", "work_dir": "./work"}, "sources": [{"uri": "./incoming"}],
              "regions": {"method": "none"}, "captioner": {"backend": "none"},
              "shards": {"output": "./out/dataset", "keep_empty": True}, "ray": {"num_cpus": 1},
              "deploy": {"interval_s": 3, "work_pool": POOL}}
    (cwd / "nightly.yaml").write_text(yaml.safe_dump(config))

    # The module's worker is already polling POOL (it made the pool; the deploy finds it there).
    try:
        out = _deploy(Path("nightly.yaml"), server.url, tmp_path / "client-home", cwd=cwd)
        assert out.returncode == 0, out.stdout + out.stderr
        assert _table(out.stdout)["build_dataset/every-few-seconds"][0] == "every 3 s", out.stdout
        with _client(server.url) as client:
            deployment = client.read_deployment_by_name("build_dataset/every-few-seconds")
            assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [3.0]
            assert [s.active for s in deployment.schedules] == [True]
            params = deployment.parameters
            # The relative paths are relative to the deployer's folder, not the worker's or the checkout's.
            assert params["config"] == str(cwd / "nightly.yaml") and params["paths_from"] == str(cwd)

            deadline = time.monotonic() + 420
            runs = []
            while not runs:  # made by the scheduler alone: nothing here creates a run
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
                assert not server.scheduler_error(), "the server's scheduler fails:\n" + server.scheduler_error()
                assert time.monotonic() < deadline, "the scheduler made no run\n" + _tail(server.log)
                time.sleep(1)
            first = min(runs, key=lambda r: r.expected_start_time)
            assert first.auto_scheduled and "auto-scheduled" in first.tags
        state = _wait_final(server.url, first.id, deadline)
    finally:  # no more builds on the shared worker: the deployment (and its scheduled runs) go, a running one is cancelled
        _forget_deployment(server.url, "build_dataset/every-few-seconds")
    assert state is not None and state.is_completed(), f"{state}\n" + _tail(worker)
    dataset = cwd / "out" / "dataset" / "dataset.json"
    assert dataset.exists(), sorted(p.relative_to(cwd).as_posix() for p in cwd.rglob("*"))
    assert (cwd / "work").is_dir()
    assert not (REPO / "out").exists() and not (REPO / "work").exists() and not (REPO / "incoming").exists()


def _forget_deployment(url: str, name: str) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelling

    with _client(url) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
        client.delete_deployment(deployment.id)
        for run in runs:
            if run.state is not None and run.state.is_running():
                client.set_flow_run_state(run.id, Cancelling(), force=True)


def _localcap(args: list[str], url: str, home: Path, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """A localcap command in its own process, talking to the server at `url` (its runs are recorded there)."""
    return subprocess.run([str(BIN / "localcap"), *args], env=_env(home, PREFECT_API_URL=url), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _events(url: str, prefix: str) -> list[dict]:
    """Events whose name starts with `prefix`, through the server's REST API (POST /events/filter)."""
    reply = httpx.post(f"{url}/events/filter", json={"filter": {"event": {"prefix": [prefix]}}, "limit": 50}, timeout=30)
    reply.raise_for_status()
    return reply.json()["events"]


@pytest.mark.slow
def test_each_published_version_starts_one_training_on_itself(server, worker, tmp_path):
    """deploy.retrain on_publish: a real server and process worker; v1 published by the build flow and
    v2 by `localcap publish` seconds later start two training runs, on v1 and on v2 (their parameters
    name the version), one after the other (one training of a dataset at a time); publishing v2's
    content again makes no version and no run. The events are read back through Prefect's API, the
    build's run is named <dataset>-<run id> and its artifact is keyed by the dataset."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterName

    name = "retrain-scenes"
    _images(tmp_path / "src", n=2)
    published = tmp_path / "published" / "scenes"
    config = run_config(tmp_path, "src", name=name, output="a", regions={"method": "none"}, ray={"num_cpus": 1},
                        shards={"keep_empty": True, "max_samples": 1}, publish={"to": str(published)},
                        train={"objective": "mae", "preset": "tiny", "output": str(tmp_path / "train"), "steps": 2,
                               "batch_size": 1, "checkpoint_every": 2, "warmup_steps": 0, "num_workers": 1,
                               "data": {"loader_workers": 0, "shuffle_buffer": 0, "holdout_shards": 0}},
                        deploy={"work_pool": POOL, "retrain": "on_publish"})
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(config))
    home = tmp_path / "client-home"

    out = _deploy(path, server.url, home, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _table(out.stdout)[f"train/{name}"][1] == f"each new version of {published}", out.stdout
    with _client(server.url) as client:  # the automation says what it does
        automation = next(a for a in client.read_automations() if a.name == f"retrain {name} on each published version")
        assert f"train/{name}" in automation.description and str(published) in automation.description
    # b (three images) first, unpublished; then a, which the build flow publishes as v1, then b as v2 at once.
    (tmp_path / "src-b").mkdir()
    for i, f in enumerate(sorted((tmp_path / "src").iterdir())):
        (tmp_path / "src-b" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "src-b" / "2.jpg").write_bytes(scene_jpeg(1299, 1300, 1100))
    b = _localcap(["run", str(path), "--run-id", "b", "--no-progress", "--set", "publish.to=null",
                   "--set", f"shards.output={tmp_path / 'b'}", "--set", f"sources=[{{uri: '{tmp_path / 'src-b'}'}}]"], server.url, home)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    a = _localcap(["run", str(path), "--run-id", "a", "--no-progress"], server.url, home)
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    # As a data engineer types it, from the folder the datasets are in: relative paths name the
    # same dataset (and its event the same resource) as the config's absolute publish.to.
    v2 = _localcap(["publish", "b", "published/scenes", "--no-progress"], server.url, home, cwd=tmp_path)
    assert v2.returncode == 0 and f"published {published / 'v2'}" in v2.stdout, v2.stdout + v2.stderr
    again = _localcap(["publish", "b", "published/scenes", "--no-progress"], server.url, home, cwd=tmp_path)
    assert again.returncode == 0 and "unchanged" in again.stdout and not (published / "v3").exists(), again.stdout + again.stderr

    with _client(server.url) as client:
        deployment = client.read_deployment_by_name(f"train/{name}")
        only_train = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        deadline = time.monotonic() + 420
        while True:
            runs = client.read_flow_runs(deployment_filter=only_train)
            if len(runs) >= 2 and all(r.state and r.state.is_final() for r in runs):
                break
            assert time.monotonic() < deadline, [(r.name, r.state) for r in runs]
            time.sleep(2)
        time.sleep(5)  # a third run (there must be none) would have been made by now
        runs = sorted(client.read_flow_runs(deployment_filter=only_train), key=lambda r: r.start_time)
        build_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"{name}-a", f"{name}-b"])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"localcap-build-{name}"])))
    assert [r.parameters["dataset_uri"] for r in runs] == [str(published / "v1"), str(published / "v2")]
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs] + [_tail(worker)]
    assert [r.name for r in runs] == ["scenes-v1", "scenes-v2"]
    assert runs[0].end_time <= runs[1].start_time, "two trainings of one dataset overlapped"
    assert sorted(r.name for r in build_runs) == [f"{name}-a", f"{name}-b"]
    assert len(artifacts) == 2

    events = {(e["event"], e["payload"].get("version") or e["payload"].get("run_id") or e["payload"].get("dataset"))
              for e in _events(server.url, "localcap.")}
    assert ("localcap.dataset.published", "v1") in events and ("localcap.dataset.published", "v2") in events
    assert ("localcap.build.completed", "a") in events and ("localcap.build.completed", "b") in events
    assert ("localcap.train.completed", str(published / "v1")) in events and ("localcap.train.completed", str(published / "v2")) in events
    assert not any(e == "localcap.dataset.published" and v == "v3" for e, v in events)
    # The publish -> retrain loop on a PostgreSQL-backed server: its log holds no ERROR line.
    assert not server_errors(server.log), server_errors(server.log)[:10]


def _kill_flow_run(flow_run_id) -> int:
    """SIGKILL every process of a flow run (the worker starts it with PREFECT__FLOW_RUN_ID in its
    environment): what a lost machine does to it. Returns how many were killed."""
    mark = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    killed = 0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed


@pytest.mark.slow
def test_retry_of_a_killed_build_resumes_the_same_run(server, worker, tmp_path):
    """The flow run of a deployment is killed mid-build (after ingest and dedupe, in regions); Prefect's
    Retry of that flow run (AwaitingRetry, as the UI's button sets it) runs the same localcap run id
    again, which skips the partitions already done."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import AwaitingRetry

    _images(tmp_path / "src", n=8)
    config = run_config(tmp_path, "src", name="retry-scenes", ingest={"partition_size": 1}, regions={"k": 2},
                        shards={"keep_empty": True}, ray={"num_cpus": 1}, prefect={"retries": 0},
                        deploy={"work_pool": POOL})
    path = tmp_path / "retry.yaml"
    path.write_text(yaml.safe_dump(config))
    out = _deploy(path, server.url, tmp_path / "client-home", cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    with temporary_settings({PREFECT_API_URL: server.url}):
        flow_run = run_deployment("build_dataset/retry-scenes", timeout=0)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "work").glob("*/regions/_plan.json")):
        assert time.monotonic() < deadline, "the build never reached regions\n" + _tail(worker)
        time.sleep(0.2)
    assert _kill_flow_run(flow_run.id) >= 1
    crashed = _wait_final(server.url, flow_run.id, time.monotonic() + 120)
    assert crashed is not None and crashed.is_final() and not crashed.is_completed(), crashed
    assert not (tmp_path / "ds" / "dataset.json").exists()
    with _client(server.url) as client:
        # The UI's Retry. Both the runner and the worker report the crash, the worker a moment later:
        # a Retry set in between is undone by the worker's report, as a user's click would be.
        for _ in range(5):
            client.set_flow_run_state(flow_run.id, AwaitingRetry())
            time.sleep(2)
            if not client.read_flow_run(flow_run.id).state.is_crashed():
                break
        run = client.read_flow_run(flow_run.id)
    state = _wait_final(server.url, flow_run.id, time.monotonic() + 300)
    assert state is not None and state.is_completed(), f"{state}\n" + _tail(worker)
    runs = [p.name for p in (tmp_path / "work").iterdir() if p.is_dir()]
    assert len(runs) == 1 and run.name == f"retry-scenes-{runs[0]}", (runs, run.name)
    record = json.loads((tmp_path / "work" / runs[0] / "run.json").read_text())
    ingest = next(s for s in record["builds"][-1]["stages"] if s["stage"] == "ingest")
    assert ingest["computed"] == 0 and ingest["skipped"] == ingest["partitions"] > 0, ingest
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["counts"]["samples"] == 8
    # Linked both ways: the flow run's name holds the run id, and `localcap status` takes the flow run's id.
    status = subprocess.run([str(BIN / "localcap"), "status", str(flow_run.id), "--work-dir", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert status.returncode == 0 and f"run {runs[0]}" in status.stdout, status.stdout + status.stderr
    assert f"Prefect flow run {run.name} ({flow_run.id})" in status.stdout and f"/runs/flow-run/{flow_run.id}" in status.stdout
