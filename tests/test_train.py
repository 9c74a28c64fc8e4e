"""The train flow on shards the pipeline built: generated colour scenes captioned over the real
OpenAI-compatible back end by a server that names the colours it is shown (the generator's knowledge
standing in for a VLM), 2 Ray Train workers (DDP), Prefect's train flow, checkpoints, resume after a
kill, MAE, and training from a version published on S3."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers.colour_scenes import ColourCaptionServer, write_colour_scenes
from tests.helpers.config import run_config
from tests.helpers.prefect_home import prefect_home

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES, PER_SHARD = 32, 4

pytestmark = pytest.mark.slow

TRAIN = {"preset": "tiny", "batch_size": 8, "lr": 0.002, "warmup_steps": 5, "num_workers": 2,
         "data": {"loader_workers": 0, "holdout_shards": 2, "shuffle_buffer": 16}}


@pytest.fixture(scope="module")
def colour_dataset(ray_local, prefect_harness, tmp_path_factory) -> Path:
    from flows.build import build_dataset

    root = tmp_path_factory.mktemp("colours")
    write_colour_scenes(root / "images", N_IMAGES)
    server = ColourCaptionServer()
    try:
        dataset = build_dataset(run_config(
            root, "images", output="dataset", name="colours",
            ingest={"min_side": 512, "partition_size": 8},
            captioner={"backend": "openai", "model": "colour-namer", "device": "cpu",
                       "openai": {"base_url": server.base_url, "api_key_env": "LOCALCAP_TEST_NO_KEY"}},
            shards={"max_samples": PER_SHARD},
        ), run_id="colours", progress=False)
    finally:
        server.close()
    assert dataset["counts"]["samples"] == N_IMAGES and dataset["counts"]["shards"] == N_IMAGES // PER_SHARD
    return root / "dataset"


def _train(dataset: str, output: Path, **fields) -> dict:
    from flows.train import train

    return train(dataset, {**TRAIN, "output": str(output), **fields})


def test_contrastive_training_beats_chance_on_held_out_regions(colour_dataset, tmp_path):
    """Acceptance: the tiny model, 2 Ray Train workers, a few dozen steps: held-out region<->caption
    recall@1 well above chance."""
    from datetime import datetime, timezone

    started = datetime.now(timezone.utc)
    result = _train(str(colour_dataset), tmp_path / "train", name="colours", steps=80, checkpoint_every=40)
    m = result["metrics"]
    assert m["step"] == 80 and m["steps_this_run"] == 80 and not m["eval_on_train"]
    assert m["eval_images"] == 2 * PER_SHARD and m["eval_regions"] >= 2 * PER_SHARD  # the held-out shards only
    assert m["distinct_region_captions"] >= 5
    for key in ("region_to_caption_r1", "caption_to_region_r1"):
        assert m[key] >= m[key + "_chance"] + 0.3, (key, m)
    assert m["last_loss"] < 0.6 * m["first_loss"]
    ckpt = Path(result["checkpoint"])
    assert (ckpt / "state.pt").is_file() and (ckpt / "tokenizer.json").is_file()
    history = json.loads((ckpt / "train.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 81))
    first, last = history[:5], history[-5:]
    assert sum(h["selection"] for h in last) < sum(h["selection"] for h in first)  # the selectors learn the boxes
    saved = json.loads((tmp_path / "train" / "colours" / "metrics.json").read_text())
    assert saved["region_to_caption_r1"] == m["region_to_caption_r1"] and saved["checkpoint"] == result["checkpoint"]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp

    def progress_logged(logs: list[str]) -> list[bool]:
        return [any(line.startswith("step 10/80 loss ") for line in logs),
                any(line.startswith("step 40/80 loss ") and line.endswith("checkpoint saved") for line in logs),
                any(line.startswith("eval: ") for line in logs)]

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["localcap-train-colours"])))
        deadline = time.monotonic() + 20  # Prefect ships logs in batches: the last ones may land after the flow returns
        while True:
            logs, page = [], None
            while page is None or len(page) == 200:  # the API's page size
                page = client.read_logs(log_filter=LogFilter(timestamp=LogFilterTimestamp(after_=started)), limit=200, offset=len(logs))
                logs += [log.message for log in page]
            if all(progress_logged(logs)) or time.monotonic() > deadline:
                break
            time.sleep(1)
    text = next(a.data for a in artifacts if "`colours`" in a.data)
    assert f"| region_to_caption_r1 | {m['region_to_caption_r1']:.3f} | {m['region_to_caption_r1_chance']:.3f} |" in text
    # Training progress in the run's Prefect logs (step 10, the checkpoint at 40, the held-out metrics),
    # not only on the Ray Train worker's stdout.
    assert progress_logged(logs) == [True, True, True], logs


def test_mae_loss_falls(colour_dataset, tmp_path):
    # One DataLoader process per rank (spawned inside the Ray Train worker), as real runs use them.
    result = _train(str(colour_dataset), tmp_path / "train", objective="mae", name="mae", steps=40, checkpoint_every=40,
                    lr=0.003, data={**TRAIN["data"], "loader_workers": 1})
    m = result["metrics"]
    assert m["step"] == 40 and m["objective"] == "mae"
    assert m["last_loss"] < 0.7 * m["first_loss"], m
    assert m["eval_images"] == 2 * PER_SHARD and m["eval_loss"] < m["first_loss"]


def test_train_from_a_version_published_on_s3_with_checkpoints_on_s3(colour_dataset, s3_endpoint, s3_bucket):
    """The trainer streams NAME (its LATEST) from S3 and checkpoints to s3://; a rerun of the
    finished run resumes at its last step and trains nothing more."""
    import boto3

    from pipeline.storage import Storage
    from pipeline.versions import publish_version

    storage = Storage(s3_endpoint)
    publish_version(storage, colour_dataset, f"s3://{s3_bucket}/datasets/colours")
    from flows.train import train

    cfg = {**TRAIN, "objective": "mae", "num_workers": 1, "steps": 6, "checkpoint_every": 3, "output": f"s3://{s3_bucket}/train"}
    first = train(f"s3://{s3_bucket}/datasets/colours", cfg, {"endpoint_url": s3_endpoint})
    assert first["name"] == "colours-v1-mae" and first["dataset"].endswith("/colours/v1")
    assert first["checkpoint"].startswith(f"s3://{s3_bucket}/train/colours-v1-mae/checkpoint_")
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
            .list_objects_v2(Bucket=s3_bucket, Prefix="train/")["Contents"]]
    assert any(k.endswith("/state.pt") for k in keys) and "train/colours-v1-mae/metrics.json" in keys
    again = train(f"s3://{s3_bucket}/datasets/colours", cfg, {"endpoint_url": s3_endpoint})
    assert again["metrics"]["resumed_from"] == 6 and again["metrics"]["steps_this_run"] == 0


def test_a_single_worker_run_killed_under_ray_is_retried_from_its_last_checkpoint(colour_dataset, tmp_path):
    """One worker runs on a Ray task: its process SIGKILLed after a checkpoint,
    the run goes on from that checkpoint within the same call, as Ray Train retries its workers."""
    import threading

    run_dir = tmp_path / "train" / "retried"
    killed: list[int] = []

    def kill_the_task_after_a_checkpoint() -> None:
        deadline = time.time() + 120
        while _last_checkpoint_step(run_dir) < 10 and time.time() < deadline:
            time.sleep(0.2)
        for p in psutil.process_iter(["cmdline"]):
            if any("train_task" in part for part in p.info["cmdline"] or []):
                killed.append(_last_checkpoint_step(run_dir))
                p.kill()

    killer = threading.Thread(target=kill_the_task_after_a_checkpoint, daemon=True)
    killer.start()
    result = _train(str(colour_dataset), tmp_path / "train", objective="mae", name="retried", num_workers=1,
                    steps=120, checkpoint_every=10, keep_checkpoints=2)
    killer.join(5)
    m = result["metrics"]
    assert killed, "the training task ended before it could be killed"
    assert m["launcher"] == "ray_task" and m["step"] == 120 and killed[0] <= m["resumed_from"] < 120, (killed, m)
    assert len(list(run_dir.glob("checkpoint_*"))) == 2 and Path(result["checkpoint"]).parent == run_dir


def _localcap(args: list[str], home: Path, api: str, **kw) -> subprocess.Popen:
    """The CLI in its own process (its own local Ray), against the session's Prefect server at `api`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env.update(PREFECT_HOME=prefect_home(home), PREFECT_API_URL=api)
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the CLI and everything it started (its local Ray included): a hard crash."""
    parent = psutil.Process(proc.pid)
    for p in parent.children(recursive=True) + [parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)


def _last_checkpoint_step(run_dir: Path) -> int:
    steps = [json.loads(f.read_text())["step"] for f in run_dir.glob("checkpoint_*/train.json")]
    return max(steps, default=0)


def test_killed_training_resumes_from_its_last_checkpoint(colour_dataset, tmp_path, prefect_harness):
    """Acceptance: kill `localcap train` (SIGKILL, with its Ray) after a checkpoint; the same command
    again continues the step counter from that checkpoint."""
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({**TRAIN, "num_workers": 1, "steps": 400, "checkpoint_every": 10, "name": "killed",
                                   "output": str(tmp_path / "out")}))
    run_dir = tmp_path / "out" / "killed"
    proc = _localcap(["train", str(colour_dataset), "--config", str(cfg)], tmp_path / "prefect", prefect_harness)
    deadline = time.time() + 300
    while _last_checkpoint_step(run_dir) < 10:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    time.sleep(1.0)  # a moment for the checkpoint's files to finish landing; the kill may still cut a later one
    _kill_tree(proc)
    killed_at = _last_checkpoint_step(run_dir)
    assert 10 <= killed_at < 400

    rerun = _localcap(["train", str(colour_dataset), "--config", str(cfg), "--set", "steps=" + str(killed_at + 20)],
                      tmp_path / "prefect", prefect_harness)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-4000:]
    assert f"resumed from the checkpoint at step {killed_at}" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from"] == killed_at and metrics["step"] == killed_at + 20 and metrics["steps_this_run"] == 20
    assert "held-out recall" in out


def _save_tiny_siglip(folder: Path, tokenizer_json: str) -> None:
    """A tiny SiglipModel (random weights) and a tokenizer saved as a pretrained directory, offline."""
    from transformers import SiglipConfig, SiglipModel

    from pipeline.train.text import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_json)
    config = SiglipConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 12, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16})
    SiglipModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_training_starts_from_a_pretrained_siglip_directory(colour_dataset, tmp_path):
    """model.pretrained: both towers and the tokenizer come from a local SigLIP directory; its sizes
    win over the config's, and its shorter text length caps max_text_len."""
    from pipeline.shards.loader import ShardDataset
    from pipeline.train.text import iter_captions, train_tokenizer

    _save_tiny_siglip(tmp_path / "siglip", train_tokenizer(iter_captions(ShardDataset(str(colour_dataset), decode=False)), 200))
    result = _train(str(colour_dataset), tmp_path / "train", name="pretrained", num_workers=1, steps=4, checkpoint_every=4,
                    model={"pretrained": str(tmp_path / "siglip"), "low_res": 64, "high_res": 256, "patch_budget": 32,
                           "max_text_len": 64})
    assert result["metrics"]["step"] == 4 and result["metrics"]["eval_regions"] > 0
    assert not (tmp_path / "train" / "pretrained" / "tokenizer.json").exists()  # the directory's own tokenizer
    state = __import__("torch").load(Path(result["checkpoint"]) / "state.pt", weights_only=True)["model"]
    assert state["vision.encoder.layers.0.self_attn.q_proj.weight"].shape == (32, 32)
    assert state["text.embeddings.position_embedding.weight"].shape[0] == 12


def test_localcaps_own_warnings_reach_the_prefect_run_logs(colour_dataset, tmp_path):
    """A dataset with no shard to hold out: the runner's warning (a `pipeline` logger, not Prefect's)
    is in the train run's Prefect logs, where the run is watched."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.train import train

    state = train(str(colour_dataset), {**TRAIN, "output": str(tmp_path / "train"), "name": "all-shards", "objective": "mae",
                                        "num_workers": 1, "steps": 2, "checkpoint_every": 2, "warmup_steps": 0,
                                        "data": {**TRAIN["data"], "holdout_shards": 99}}, return_state=True)
    assert state.is_completed()
    flow_run_ids = [state.state_details.flow_run_id]
    with get_client(sync_client=True) as client:
        deadline, found = time.monotonic() + 20, []  # Prefect ships logs in batches
        while not found and time.monotonic() < deadline:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)), limit=200)
            found = [log for log in logs if "evaluating on the training shards" in log.message]
            time.sleep(0.5)
    assert found and found[0].level == logging.WARNING


@pytest.mark.gpu
def test_training_on_gpu_with_bf16(colour_dataset, tmp_path):
    result = _train(str(colour_dataset), tmp_path / "train", name="gpu", num_workers=1, use_gpu=True, steps=20,
                    checkpoint_every=20)
    assert result["metrics"]["step"] == 20 and result["metrics"]["last_loss"] < result["metrics"]["first_loss"]


def test_start_previous_version_fine_tunes_from_the_earlier_versions_run(colour_dataset, tmp_path):
    """v2's run with start previous_version begins with v1's final weights and tokenizer (at a
    learning rate too small to move them, its checkpoint holds v1's weights); start scratch (the
    default) begins from the seed's random weights."""
    import torch

    from pipeline.storage import Storage
    from pipeline.versions import publish_version

    name = tmp_path / "published" / "colours"
    publish_version(Storage(), colour_dataset, str(name), progress=False)
    publish_version(Storage(), colour_dataset, str(name), progress=False, force=True)  # v2: the same snapshot again
    cfg = {"num_workers": 1, "steps": 2, "checkpoint_every": 2, "warmup_steps": 0}
    v1 = _train(str(name / "v1"), tmp_path / "train", **cfg)
    assert v1["metrics"]["init_from"] is None
    still = {**cfg, "lr": 1e-12}
    tuned = _train(str(name / "v2"), tmp_path / "train", **still, start="previous_version")
    assert tuned["metrics"]["init_from"] == v1["checkpoint"] and tuned["metrics"]["step"] == 2
    scratch = _train(str(name / "v2"), tmp_path / "train", **still, name="v2-scratch")
    assert scratch["metrics"]["init_from"] is None

    def weights(result):
        return torch.load(Path(result["checkpoint"]) / "state.pt", weights_only=True)["model"]

    first, fine, fresh = weights(v1), weights(tuned), weights(scratch)
    assert all(torch.allclose(first[k].float(), fine[k].float(), atol=1e-6) for k in first)
    assert not all(torch.allclose(first[k].float(), fresh[k].float(), atol=1e-6) for k in first)
    assert (tmp_path / "train" / tuned["name"] / "tokenizer.json").read_text() == (tmp_path / "train" / v1["name"] / "tokenizer.json").read_text()
