"""A two-node Ray cluster on one machine: `ray start --head` and a second `ray start` on 127.0.0.1,
each with its own CPU count and a custom resource; build_dataset runs against it through RAY_ADDRESS
(the CLI in a subprocess, as a data engineer would), work lands on both nodes, and the output equals
a local run's."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.helpers.config import run_config
from tests.helpers.images import scene_jpeg
from tests.helpers.prefect_home import prefect_home

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _stop_cluster(markers: list[str]) -> None:
    """Kill this cluster's processes only (`ray stop` would also stop the test session's own Ray)."""
    import psutil

    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.pid != os.getpid() and any(m in cmd for m in markers):
            procs.append(proc)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture
def two_node_cluster(ray_local):  # the session's own Ray first (it is asked for as address="local" anyway)
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    common = ["--disable-usage-stats"]
    head = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
            '--resources={"head_node": 1}', "--include-dashboard=false", f"--temp-dir={temp_dir}", *common]
    worker = [RAY, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
              '--resources={"second_node": 1}', *common]
    try:
        for cmd in (head, worker):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        _stop_cluster([temp_dir, f"127.0.0.1:{port}", f"gcs_server_port={port}"])
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_build_on_two_nodes_equals_local_run(build, two_node_cluster, tmp_path, prefect_harness):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"{i}.jpg").write_bytes(scene_jpeg(1000 + i, 1300 + 32 * i, 1100))
    def config(name: str) -> dict:
        return run_config(tmp_path, src, work=f"work-{name}", output=f"ds-{name}", ingest={"partition_size": 1},
                          shards={"max_samples": 3})

    build(config("local"), run_id="same")

    config_path = tmp_path / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config("cluster")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(RAY_ADDRESS=two_node_cluster, PREFECT_HOME=prefect_home(tmp_path / "prefect-home"), RAY_AUTH_MODE="disabled",
               PREFECT_API_URL=prefect_harness)
    def run_cli(run_id: str, *sets: str) -> list[str]:
        """Build through the CLI against the cluster; the nodes the ingest partitions ran on."""
        cmd = [sys.executable, "-m", "flows.cli", "run", str(config_path), "--run-id", run_id, "--no-progress"]
        done = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        run = json.loads((tmp_path / "work-cluster" / run_id / "run.json").read_text())
        return next(s for s in run["stages"] if s["stage"] == "ingest")["nodes"]

    assert len(run_cli("same")) == 2  # the 8 one-image partitions ran on both nodes

    local, cluster = _files(tmp_path / "ds-local"), _files(tmp_path / "ds-cluster")
    assert sorted(local) == sorted(cluster)
    for name in local:
        if name == "dataset.json":
            a, b = json.loads(local[name]), json.loads(cluster[name])
            for d in (a, b):
                for key in ("created_at", "updated_at", "timings", "builds", "config"):
                    d.pop(key)
            assert a == b
        elif name.startswith("wids-"):
            assert json.loads(local[name])["shardlist"] == json.loads(cluster[name])["shardlist"]
        else:
            assert local[name] == cluster[name], name

    # Told that CPU stages belong on nodes with `second_node` (as infra/ray marks CPU workers), they stay there.
    assert len(run_cli("pinned", "ray.cpu_stage_resource=second_node", f"shards.output={tmp_path / 'ds-pinned'}")) == 1
