"""What an operator sees when something outside the code is wrong: one line on stderr naming what to
fix, exit 2 for usage and config (and what a run's checks refuse before it starts), exit 1 for a
remote failure of an operator command; no traceback, and nothing started. Run as a user runs it:
the CLI in its own process, against real S3 endpoints (moto's server, one of them checking
credentials as AWS does)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest

from tests.helpers.config import run_config
from tests.helpers.datasets import fake_dataset
from tests.helpers.prefect_home import prefect_home

ROOT = Path(__file__).resolve().parents[1]
NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None,
                  "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}
_AUTH_SERVER = textwrap.dedent("""
    import os, sys, time
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # the set-up's three calls, then every request is checked
    from moto.server import ThreadedMotoServer
    ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False).start()
    print("up", flush=True)
    while True:
        time.sleep(60)
""")


@pytest.fixture(scope="module")
def checking_s3():
    """(endpoint, bucket, access key, secret) of a moto server that checks credentials: the key
    belongs to a user without any permission."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", _AUTH_SERVER, str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        endpoint = f"http://127.0.0.1:{port}"
        root = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "AKIAROOTSETUP", "aws_secret_access_key": "x"}
        boto3.client("s3", **root).create_bucket(Bucket="guarded")
        iam = boto3.client("iam", **root)
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        yield endpoint, "guarded", key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.kill()
        proc.wait()


def localcap(args: list[str], env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "AWS_"))}
    full["PREFECT_HOME"] = prefect_home(tmp_path / "prefect-home")
    full["RAY_TMPDIR"] = str(tmp_path / "ray")  # Ray must not start: this folder must stay absent
    full |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=120)


def test_each_operator_error_is_one_line(tmp_path, s3_endpoint, s3_bucket, checking_s3):
    auth_endpoint, guarded, key, secret = checking_s3
    (tmp_path / "imgs").mkdir()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(run_config(tmp_path, "imgs")))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"dataset: s3://{s3_bucket}/ds\noutput: {tmp_path / 'sweeps'}\nstorage: {{endpoint_url: 'http://127.0.0.1:9'}}\n"
                     "grid: {images: [4], resolution: [64], model: [vit-s], objective: [mae]}\n"
                     "models: {vit-s: {hidden_size: 32, layers: 1, heads: 2, mlp_size: 64}}\n")
    ds = fake_dataset(tmp_path / "ds", "k")  # a built dataset's files, no captioner: what `train` checks first
    dead, live = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, {"AWS_ENDPOINT_URL": s3_endpoint}
    refused = {"AWS_ENDPOINT_URL": auth_endpoint, "AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY", "AWS_SECRET_ACCESS_KEY": "nope"}
    powerless = {"AWS_ENDPOINT_URL": auth_endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    train = ["train", str(ds), "--set", f"output={tmp_path / 'train'}"]
    cases = {  # name: (arguments, environment, what the line must say, exit code)
        "S3 unreachable": (["versions", f"s3://{s3_bucket}/ds"], dead, "cannot reach the S3 endpoint http://127.0.0.1:9", 1),
        "bucket missing": (["pull", "s3://no-such-bucket-here/ds/LATEST", str(tmp_path / "pulled")], live, "'no-such-bucket-here' does not exist", 1),
        "credentials refused": (["versions", f"s3://{guarded}/ds"], refused, "refused the credentials (InvalidAccessKeyId)", 1),
        "access denied": (["gc", f"s3://{guarded}/ds", "--keep", "1"], powerless, "access denied", 1),
        "no credentials": (["publish", str(ds), f"s3://{s3_bucket}/ds"], live | NO_CREDENTIALS, "no AWS credentials", 1),
        "--set past a list's end": (["run", str(cfg), "--set", "sources.3.uri=/x"], {}, "cannot add one", 2),
        "--set into a list by index": (["run", str(cfg), "--set", "sources.0.uri=/no/such/folder"], {}, "sources.0.uri: files source /no/such/folder", 2),
        "config key that does not exist": (["run", str(cfg), "--set", "ingest.min_sidee=3"], {}, "ingest.min_sidee: Extra inputs", 2),
        "config file that does not exist": (["run", "nope.yaml"], {}, "config file not found: nope.yaml", 2),
        "train: no dataset there": (["train", str(tmp_path / "nothing"), "--set", f"output={tmp_path / 'train'}"], {}, "DATASET:", 2),
        "train: dataset without captions": (train, {}, "needs captions", 2),
        "train: GPUs that are not there": (train + ["--set", "objective=mae", "--set", "use_gpu=true"], {"CUDA_VISIBLE_DEVICES": ""}, "GPU", 2),
        "train: bucket missing": (["train", "s3://no-such-bucket-here/ds", "--set", f"output={tmp_path / 'train'}"], live, "does not exist", 2),
        "sweep: S3 unreachable": (["sweep", str(sweep)], {}, "cannot reach the S3 endpoint http://127.0.0.1:9", 2),
    }

    def attempt(item):
        name, (args, env, expected, code) = item
        start = time.perf_counter()
        out = localcap(args, env, tmp_path)
        return name, out, time.perf_counter() - start, expected, code

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(attempt, cases.items()))
    for name, out, took, expected, code in results:
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == code, (name, out.returncode, out.stderr[-2000:])
        assert len(lines) == 1 and expected in lines[0], (name, lines[:20])
        assert took < 30, (name, took)
    assert not (tmp_path / "ray").exists()  # no Ray was started by any of them
    assert not (tmp_path / "train").exists() and not (tmp_path / "pulled").exists()
