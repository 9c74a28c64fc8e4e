"""The `localcap` command line, run as a user runs it (a subprocess, its own Ray and Prefect)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from captioners.tiny import SCENES_MODEL
from schemas.config import load_config
from tests.helpers.prefect_home import prefect_home

ROOT = Path(__file__).resolve().parents[1]


def localcap(*args: str, tmp_path: Path, timeout: int = 600, api: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in its own process; Prefect in ephemeral mode (its own temporary server), or the
    session's server at `api`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = prefect_home(tmp_path / "prefect-home")
    if api:
        env["PREFECT_API_URL"] = api
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_explains_each_command(tmp_path):
    out = localcap("--help", tmp_path=tmp_path)
    assert out.returncode == 0
    for command in ("run", "inspect", "demo", "train", "sweep"):
        assert command in out.stdout
    run_help = localcap("run", "--help", tmp_path=tmp_path).stdout
    assert "--run-id" in run_help and "resume" in run_help.lower() and "--train" in run_help
    sweep_help = " ".join(localcap("sweep", "--help", tmp_path=tmp_path).stdout.split())
    assert "--demo" in sweep_help and "Ray Tune" in sweep_help and "finished trials are not rerun" in sweep_help
    train_help = " ".join(localcap("train", "--help", tmp_path=tmp_path).stdout.split())
    assert "NAME/LATEST" in train_help and "--config" in train_help and "resumes from its last checkpoint" in train_help


def test_bad_train_config_names_the_field(tmp_path):
    out = localcap("train", str(tmp_path), "--set", "model.high_res=1000", tmp_path=tmp_path, timeout=60)
    assert out.returncode == 2 and "model" in out.stderr and "multiple of patch_size" in out.stderr


def test_bad_config_fails_before_work_naming_the_field(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"sources: [{{uri: {tmp_path}}}]\nshards: {{output: {tmp_path / 'ds'}}}\ningest: {{min_side: -3}}\n")
    out = localcap("run", str(cfg), tmp_path=tmp_path, timeout=60)
    assert out.returncode == 2
    assert "ingest.min_side" in out.stderr
    assert not (tmp_path / "ds").exists()


def test_bad_run_id_is_refused(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(f"sources: [{{uri: {tmp_path}}}]\nshards: {{output: {tmp_path / 'ds'}}}\n")
    out = localcap("run", str(cfg), "--run-id", "../escape", tmp_path=tmp_path, timeout=120)
    assert out.returncode == 2 and "--run-id" in out.stderr


def test_inspect_of_a_non_dataset_is_a_clear_error(tmp_path):
    out = localcap("inspect", str(tmp_path), tmp_path=tmp_path, timeout=60)
    assert out.returncode == 2 and "dataset.json" in out.stderr


@pytest.mark.slow
def test_demo_builds_trains_and_inspect_shows_it(tmp_path, prefect_harness):
    """Acceptance: the demo builds a dataset from generated 2K-4K images and trains the tiny model on
    it (`end_to_end`, as `localcap run CONFIG --train` does): images to a checkpoint in one command,
    Prefect in ephemeral mode as on a fresh machine; `localcap inspect` shows the dataset. The later
    commands use the session's Prefect server (ephemeral mode is the first command's proof)."""
    demo = tmp_path / "demo"
    # The demo's training, shortened (`make demo` runs its full 600 steps in CI): --set reaches the run config.
    out = localcap("demo", "--out", str(demo), "--images", "4", "--train", "--set", "train.steps=60", tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    built = json.loads((demo / "dataset" / "dataset.json").read_text())
    c = built["counts"]
    # Only images PS3 can train on are samples: a box with an accepted caption and a global caption.
    # With the trained scene captioner every demo scene has captioned boxes and a global caption.
    assert c["inputs"] == 6 == c["samples"] + c["rejected"] and c["samples"] == 4
    assert c["rejected_by_reason"] == {"not_an_image": 1, "too_small": 1}
    assert built["captions"]["by_status"] == {"ok": built["captions"]["total"]}
    metrics = json.loads((demo / "train" / "demo-dataset-local_contrastive" / "metrics.json").read_text())
    train_cfg = load_config(ROOT / "flows" / "demo.yaml").train
    assert metrics["step"] == 60 and metrics["eval_on_train"] == (c["shards"] <= train_cfg.data.holdout_shards)
    assert (Path(metrics["checkpoint"]) / "state.pt").is_file()
    assert f"checkpoint {metrics['checkpoint']}" in out.stdout

    # A second `localcap demo` writes the same scenes again and leaves their files alone (their mtimes
    # are part of the ingest fingerprint): the build resumes and computes no ingest partition.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (demo / "images").iterdir()}
    second = localcap("demo", "--out", str(demo), "--images", "4", tmp_path=tmp_path, api=prefect_harness)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (demo / "images").iterdir()} == mtimes
    record = json.loads((demo / "work" / "demo" / "run.json").read_text())
    ingest = next(s for s in record["builds"][-1]["stages"] if s["stage"] == "ingest")
    assert ingest["computed"] == 0 and ingest["skipped"] == ingest["partitions"] > 0, ingest

    # The same through `localcap run CONFIG --train` on the demo set, typed as a user types it from the
    # checkout's root (the config, and the captioner path inside it, relative): the build resumes (run
    # id demo, every partition done: the relative model path is the shipped model), then a fresh
    # training run (a short one: the demo's full training is the first command's).
    sets = [f"sources=[{{uri: '{demo / 'images'}'}}]", f"run.work_dir={demo / 'work'}", f"shards.output={demo / 'dataset'}",
            f"train.output={demo / 'train-again'}", "train.steps=10"]
    assert load_config(ROOT / "flows" / "demo.yaml", base=ROOT).captioner.model == str(SCENES_MODEL)
    again = localcap("run", "flows/demo.yaml", "--run-id", "demo", "--train", "--no-progress",
                     *[arg for s in sets for arg in ("--set", s)], tmp_path=tmp_path, api=prefect_harness)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"run demo: {c['samples']} samples in {c['shards']} shards" in again.stdout
    assert "trained demo-dataset-local_contrastive" in again.stdout
    assert json.loads((demo / "train-again" / "demo-dataset-local_contrastive" / "metrics.json").read_text())["step"] == 10
    manifest = pq.read_table(demo / "dataset" / "manifest.parquet").to_pylist()
    assert len(manifest) == c["samples"] and all(min(m["width"], m["height"]) >= 1440 for m in manifest)
    rerun = json.loads((demo / "dataset" / "dataset.json").read_text())
    assert rerun["timings"]["stage_seconds"] == built["timings"]["stage_seconds"]  # the resumed build computed nothing

    shown = localcap("inspect", str(demo / "dataset"), tmp_path=tmp_path, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"{c['samples']} in {c['shards']} shards, from 6 inputs" in shown.stdout
    assert "not_an_image" in shown.stdout and "too_small" in shown.stdout
    assert "image_000000.tar (" in shown.stdout and '"type":"natural"' in shown.stdout
