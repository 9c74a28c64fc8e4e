"""Deployments for data engineers: `localcap deploy` registers build_dataset with a real Prefect API
(the test harness's server), a process worker picks up a run triggered through the API, and the run
completes with the dataset written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.images import scene_jpeg

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_deploy_trigger_and_complete(prefect_harness, ray_local, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        (src / f"{i}.jpg").write_bytes(scene_jpeg(1200 + i, 1300, 1100))
    config = {"run": {"name": "nightly-scenes", "work_dir": str(tmp_path / "work")}, "sources": [{"uri": str(src)}],
              "regions": {"method": "none"}, "shards": {"output": str(tmp_path / "ds")},
              "deploy": {"cron": "0 3 * * *", "work_pool": "localcap-test"}}
    config_path = tmp_path / "nightly.yaml"
    config_path.write_text(yaml.safe_dump(config))

    # The CLI in its own process (as a data engineer runs it), against the harness's API server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "client-home"), RAY_AUTH_MODE="disabled")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", str(config_path)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "deployed build_dataset/nightly-scenes" in out.stdout and "cron 0 3 * * *" in out.stdout

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("build_dataset/nightly-scenes")
        assert deployment.work_pool_name == "localcap-test"
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
        assert deployment.parameters["config"]["shards"]["output"] == str(tmp_path / "ds")
        # The retrain deployments come with it, on demand (the cron belongs to deploy.flow, build_dataset).
        end_to_end = client.read_deployment_by_name("end_to_end/nightly-scenes")
        train = client.read_deployment_by_name("train/nightly-scenes")
        assert end_to_end.schedules == [] and train.schedules == []
        assert end_to_end.parameters["config"] == deployment.parameters["config"]
        assert train.parameters["dataset_uri"] == str(tmp_path / "ds")
        assert train.parameters["train_config"]["objective"] == "local_contrastive"
    assert "deployed end_to_end/nightly-scenes" in out.stdout and "deployed train/nightly-scenes" in out.stdout

    flow_run = run_deployment("build_dataset/nightly-scenes", timeout=0)  # triggered through the API
    env["PREFECT_HOME"] = str(tmp_path / "worker-home")
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", "localcap-test",
                               "--type", "process"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                state = client.read_flow_run(flow_run.id).state
                if state is not None and state.is_final():
                    break
                time.sleep(2)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:  # a worker still tearing down is not what this test is about
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(20)
        log.close()
    assert state is not None and state.is_completed(), f"{state}\n" + (tmp_path / "worker.log").read_text()[-4000:]
    assert (tmp_path / "ds" / "dataset.json").exists()
