"""Shared test harness: one local Ray, one Prefect test harness and one local S3 server per session."""

from __future__ import annotations

import os

# Fake credentials before anything starts Ray: its workers inherit this environment.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
from flows import environment  # noqa: E402  (the CLI's settings, as every localcap process has them)

environment.apply()

import shutil
import subprocess

import pytest


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")  # never a `ray start` cluster
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server for the session: in-process flows use it, and so do the CLI's
    subprocesses given its URL (PREFECT_API_URL), which then start no temporary server of their own."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP API (moto's server) on 127.0.0.1; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket per test on the local S3 server."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "bucket"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield name


@pytest.fixture
def build(ray_local, prefect_harness):
    """Run the real `build_dataset` flow (Ray + Prefect) on a config dict."""
    from flows.build import build_dataset

    def _build(config: dict, run_id: str = "test", **kw):
        return build_dataset(config, run_id=run_id, progress=False, **kw)

    return _build


@pytest.fixture(scope="session")
def scene_vlm(tmp_path_factory):
    """The shipped tiny Qwen2-VL trained on the synthetic scenes (captioners/models/tiny-scenes), copied
    to a session folder (servers write logs beside the model); its directory."""
    from captioners.tiny import SCENES_MODEL

    folder = tmp_path_factory.mktemp("models") / "tiny-scenes"
    shutil.copytree(SCENES_MODEL, folder)
    return str(folder)


# ==== PS3 conformance (issue 15, point 3) ====================================================== begin
# After each test, every dataset folder under the session's basetemp that is new or changed since the
# last check (dataset.json + image/ | text_box/ | combined/, judged by mtimes and sizes) is read by
# tests/helpers/ps3_conformance.py the way PS3's loader reads it, for 50 seeds; any sample PS3 would crash on
# or train on nothing with fails the test (in teardown). Plain Python: no Ray, no torch. Exempt:
# datasets built with shards.keep_empty (only their pairing, decoding, types and box geometry are
# judged), folders whose dataset.json lacks the build's config (made by hand in a test), tests marked
# @pytest.mark.no_ps3_conformance (for datasets broken on purpose), and LOCALCAP_PS3_CONFORMANCE=0.

_PS3_CHECKED: dict = {}  # dataset folder -> its signature when last seen
# The tmp_paths of finished tests: nothing writes there any more, so they are not walked again (the
# walk of the whole basetemp after each test grew with the session). Module and session folders
# (tmp_path_factory.mktemp) stay walked: a later test may rebuild a dataset in them.
_PS3_FINISHED: set = set()
# Tests that break a built dataset on purpose, until their files carry @pytest.mark.no_ps3_conformance.
_PS3_OPT_OUT = {"tests/test_shards.py::test_iter_paired_detects_mismatch"}
_ps3_previous_configure = globals().get("pytest_configure")


def pytest_configure(config):
    if _ps3_previous_configure is not None:
        _ps3_previous_configure(config)
    config.addinivalue_line("markers", "no_ps3_conformance: do not check the datasets this test builds against PS3's loader")


@pytest.fixture(autouse=True)
def _ps3_conformance(request, tmp_path_factory):
    yield
    if os.environ.get("LOCALCAP_PS3_CONFORMANCE", "1") == "0":
        return
    from tests.helpers.ps3_conformance import dataset_rules, dataset_signature, find_datasets, ps3_problems

    skip = request.node.get_closest_marker("no_ps3_conformance") is not None or request.node.nodeid in _PS3_OPT_OUT
    failures = []
    live = [entry for entry in tmp_path_factory.getbasetemp().iterdir() if entry not in _PS3_FINISHED]
    own = request.node.funcargs.get("tmp_path")
    if own is not None:
        _PS3_FINISHED.add(own)
    for folder in (found for entry in live for found in find_datasets(entry)):
        signature = dataset_signature(folder)
        if _PS3_CHECKED.get(folder) == signature:
            continue
        _PS3_CHECKED[folder] = signature
        rules = dataset_rules(folder)
        if skip or not rules.from_config:
            continue
        problems = ps3_problems(folder, seeds=range(50), rules=rules, max_problems=20)
        if problems:
            failures.append(f"{folder}:\n  " + "\n  ".join(problems))
    if failures:
        pytest.fail("datasets PS3's loader would crash on or train on nothing with (tests/helpers/ps3_conformance.py):\n"
                    + "\n".join(failures), pytrace=False)
# ==== PS3 conformance (issue 15, point 3) ======================================================== end
