"""Scaling sweeps: the plan, the data-size subsets, the probe, and `localcap sweep` run as a user runs it
(the built-in CI grid end to end; a sweep killed with SIGKILL resumes without rerunning finished trials)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.shards.loader import ShardDataset, first_samples
from pipeline.sweep.run import plan
from pipeline.train.probe import knn_accuracy, majority_share
from schemas.config import ConfigError
from schemas.sweep import TRIAL_SCHEMA, SweepConfig, load_sweep_config, trial_config, trial_id
from tests.helpers.prefect_home import prefect_home

LOCALCAP = str(Path(sys.executable).with_name("localcap"))  # the console script, as a user types it
SWEEP_DEMO = Path(__file__).resolve().parents[1] / "flows" / "sweep-demo.yaml"


def _sweep(**changes) -> SweepConfig:
    data = yaml.safe_load(SWEEP_DEMO.read_text()) | {"dataset": "/data/ds"}
    for key, value in changes.items():
        data[key] = value
    return SweepConfig.model_validate(data)


def _env(tmp_path: Path, api: str) -> dict:
    """The CLI's environment: a migrated Prefect home, and the session's Prefect server at `api`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=prefect_home(tmp_path / "prefect-home"), PREFECT_API_URL=api)
    return env


# -- the plan ------------------------------------------------------------------------------------

def test_the_demo_grid_plans_every_point_with_stable_ids():
    sweep = _sweep()
    trials = plan(sweep, "/out/ci-grid")
    assert len(trials) == 3 * 3 * 2 and len({t.id for t in trials}) == 18
    assert [t.id for t in plan(_sweep(), "/out/ci-grid")] == [t.id for t in trials]  # the same config: the same ids
    first = trials[0]
    assert first.id.startswith("mae-xs-n6-r32-") and first.train.output == "/out/ci-grid/trials" and first.train.name == first.id
    # A changed training config is a new trial (never a stale result); a grown grid keeps the old trials' ids.
    assert not {t.id for t in plan(_sweep(train=sweep.train.model_dump() | {"lr": 0.01}), "/o")} & {t.id for t in trials}
    grown = _sweep(grid=sweep.grid.model_dump() | {"images": [6, 12, 24, 48]})
    assert {t.id for t in trials} < {t.id for t in plan(grown, "/o")}


def test_a_trial_config_applies_its_point():
    sweep = _sweep()
    point = next(p for p in sweep.points() if (p.model, p.images, p.resolution) == ("s", 12, 64))
    cfg = trial_config(sweep, point)
    assert cfg.objective == "mae" and cfg.mae.image_size == 64 and cfg.data.max_images == 12
    assert (cfg.model.hidden_size, cfg.model.layers, cfg.model.patch_size) == (64, 2, 8)
    assert cfg.steps == 40 * 12 // 8  # epochs x images / batch
    # The two model sizes differ as the study needs: the trial's `params` (the loop's count) of s is over twice xs's.
    from pipeline.train.loop import build_model

    params = {p.model: sum(t.numel() for t in build_model(trial_config(sweep, p), None).parameters())
              for p in sweep.points() if p.images == 6 and p.resolution == 32}
    assert params["s"] > 2 * params["xs"], params
    contrastive = _sweep(grid={"images": [4], "resolution": [128], "model": ["tiny"], "objective": ["local_contrastive"]}, epochs=None)
    cfg = trial_config(contrastive, contrastive.points()[0])
    assert cfg.model.high_res == 128 and cfg.model.hidden_size == 64 and cfg.steps == contrastive.train.steps
    assert trial_id(contrastive.points()[0], cfg).startswith("local_contrastive-tiny-n4-r128-")


@pytest.mark.parametrize("changes, message", [
    ({"grid": {"images": [4], "resolution": [36], "model": ["xs"]}}, "multiple of patch_size"),
    ({"grid": {"images": [4], "resolution": [32], "model": ["huge"]}}, "'huge' is neither in `models` nor built in"),
    ({"models": {"xs": {"hidden_sise": 8}}}, "unknown model field(s) ['hidden_sise']"),
    ({"grid": None, "trials": None}, "a sweep needs `grid` or `trials`"),
])
def test_bad_sweep_configs_say_what_is_wrong(tmp_path, changes, message):
    data = yaml.safe_load(SWEEP_DEMO.read_text()) | changes
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_sweep_config(path)
    assert message in str(err.value)


def test_relative_paths_are_taken_against_the_callers_folder(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP_DEMO.read_text())
    cfg = load_sweep_config(path, {"output": "out", "train.output": "t"}, base=tmp_path)
    assert cfg.dataset == str(tmp_path / "sweep-demo" / "dataset") and cfg.output == str(tmp_path / "out")
    assert cfg.train.output == str(tmp_path / "t")


def test_first_samples_are_nested():
    sizes = {"a.tar": 4, "b.tar": 4, "c.tar": 2}
    assert first_samples(list(sizes), sizes, None) == {}
    assert first_samples(list(sizes), sizes, 6) == {"a.tar": 4, "b.tar": 2}
    assert first_samples(list(sizes), sizes, 10) == sizes


# -- the probe -----------------------------------------------------------------------------------

def test_knn_probe_leaves_each_regions_own_image_out():
    # Each image holds one "a" and one "b" region whose features are near each other (the scene), while
    # across images the kinds cluster: only neighbours from other images tell the kinds apart.
    rng = np.random.default_rng(0)
    kinds = {"a": rng.normal(size=256), "b": rng.normal(size=256)}
    features, labels, groups = [], [], []
    for image in range(6):
        scene = rng.normal(size=256) * 3
        for label in ("a", "b"):
            features.append(scene + kinds[label] * 2 + rng.normal(size=256) * 0.1)
            labels.append(label)
            groups.append(image)
    assert knn_accuracy(np.array(features), labels, groups, k=3) == 1.0
    assert knn_accuracy(np.array(features), labels, [0] * len(labels), k=3) is None  # no other image: no figure
    flipped = ["b" if g % 2 else lab for lab, g in zip(labels, groups)]  # labels that the features cannot predict
    assert knn_accuracy(np.array(features), flipped, groups, k=3) < 1.0
    assert majority_share(["a", "a", "b", "c"]) == 0.5


def test_the_probe_runs_on_an_untrained_model_of_each_objective():
    import torch

    from pipeline.train.loop import build_model
    from pipeline.train.model import LocalContrastiveModel
    from pipeline.train.probe import probe_metrics
    from schemas.train import TrainConfig

    mae = TrainConfig(objective="mae", preset="tiny", probe={"images": 6})
    out = probe_metrics({"": build_model(mae, None)}, mae, None, torch.device("cpu"))
    assert out["probe_regions"] == 24 and out["probe_classes"] >= 2 and 0 <= out["probe_acc"] <= 1
    assert 0 < out["probe_chance"] < 1
    contrastive = TrainConfig(preset="tiny", probe={"images": 6, "label": "kind_colour"})
    out = probe_metrics({"": LocalContrastiveModel(contrastive.model_options(), 400), "_init": LocalContrastiveModel(contrastive.model_options(), 400)},
                        contrastive, None, torch.device("cpu"))
    assert out["probe_regions"] == 24 and out["probe_classes"] > 4 and out["probe_acc"] is not None and out["probe_acc_init"] is not None


# -- `localcap sweep`, as a user runs it -----------------------------------------------------------

# The built-in grid (18 trials) cut to one model size x two resolutions x three data sizes for CI: what
# the study shows (resolution matters at every data size, a law fitted per model with its uncertainty)
# needs no second model; that a bigger model has more parameters is test_a_trial_config_applies_its_point's.
DEMO_GRID = {"grid.model": ["s"], "grid.resolution": [32, 128]}
DEMO_SETS = [arg for key, value in DEMO_GRID.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


@pytest.fixture(scope="module")
def demo_sweep(tmp_path_factory, prefect_harness):
    """`localcap sweep --demo` typed in an empty folder (with the CI grid's --set), end to end."""
    cwd = tmp_path_factory.mktemp("sweep-demo-user")
    started = time.monotonic()
    out = subprocess.run([LOCALCAP, "sweep", "--demo", *DEMO_SETS], cwd=cwd, env=_env(cwd, prefect_harness), capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return cwd, out, time.monotonic() - started


@pytest.mark.slow
def test_the_demo_sweep_writes_the_trials_the_fit_and_the_plots(demo_sweep):
    cwd, out, seconds = demo_sweep
    folder = cwd / "sweep-demo" / "sweeps" / "ci-grid"  # the relative paths of the built-in config, under the user's folder
    assert "6 of 6 trials finished (6 run now)" in out.stdout, out.stdout
    table = pq.read_table(folder / "results.parquet")
    assert table.schema.equals(TRIAL_SCHEMA) and table.num_rows == 6
    rows = table.to_pylist()
    assert {r["status"] for r in rows} == {"finished"} and all(0 <= r["metric"] <= 1 for r in rows)
    assert {(r["model"], r["images"], r["resolution"]) for r in rows} == {("s", n, r) for n in (6, 12, 24) for r in (32, 128)}
    assert {r["steps"] for r in rows} == {30, 60, 120}
    params = {(r["resolution"], r["params"]) for r in rows}  # one model: its size changes only with the position embeddings
    assert len(params) == 2 and all(p > 0 for _, p in params)
    # What the study is about: at 32 px a planted object is one blurred patch; at 128 px its texture is visible.
    by_res = {res: np.mean([r["metric"] for r in rows if r["resolution"] == res]) for res in (32, 128)}
    assert by_res[128] > by_res[32] + 0.1, by_res

    fit = json.loads((folder / "fit.json").read_text())
    assert fit["metric"] == "probe_acc" and [(g["objective"], g["model"]) for g in fit["groups"]] == [("mae", "s")]
    for group in fit["groups"]:
        assert group["n_trials"] == 6 and group["best"] in group["laws"]
        product = group["laws"]["log_product"]
        assert product["status"] == "ok" and set(product["ci95"]) == {"b", "a", "c"} and product["loo_rmse"] is not None
        assert set(product["paper_form"]) == {"beta_i", "alpha_i", "alpha_ppi", "beta_ppi"}
        assert group["needed"]["target"] == 0.6 and group["needed"]["rows"]
    for name in ("metric_vs_images.png", "metric_vs_resolution.png", "heatmap.png"):
        with Image.open(folder / name) as img:
            assert img.format == "PNG" and img.width > 500  # a real plot (one model: ~600 px wide)
    # A trial's data size: the first N images of the training shards, in shard order.
    dataset = str(cwd / "sweep-demo" / "dataset")
    every = [s["key"] for s in ShardDataset(dataset, decode=False)]
    first = ShardDataset(dataset, decode=False, max_samples=10)
    assert [s["key"] for s in first] == every[:10] and len(first) == 10
    page = (folder / "index.html").read_text()
    assert all(r["trial_id"] in page for r in rows) and '<img src="heatmap.png"' in page
    assert "page: " + str(folder / "index.html") in out.stdout
    print(f"demo sweep: {seconds:.0f} s")


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(demo_sweep, tmp_path, prefect_harness):
    cwd, _, _ = demo_sweep
    config = tmp_path / "resume.yaml"
    data = yaml.safe_load(SWEEP_DEMO.read_text()) | {
        "name": "resume", "dataset": str(cwd / "sweep-demo" / "dataset"), "output": "sweeps", "epochs": None,
        "grid": {"images": [6, 12], "resolution": [32], "model": ["xs"]}, "max_concurrent_trials": 1}
    data["train"] |= {"steps": 20}
    data["fit"] |= {"bootstrap": 20}
    config.write_text(yaml.safe_dump(data))
    trials = tmp_path / "sweeps" / "resume" / "trials"

    log_path = tmp_path / "killed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([LOCALCAP, "sweep", "resume.yaml"], cwd=tmp_path, env=_env(tmp_path, prefect_harness), start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and not list(trials.glob("*/result.json")):
            time.sleep(0.1)
        alive = proc.poll() is None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert alive, "the sweep ended before it could be killed:\n" + log_path.read_text()[-3000:]
    time.sleep(3)  # Ray's workers notice their raylet is gone; one could still be writing
    finished = {p.parent.name: p.stat().st_mtime_ns for p in trials.glob("*/result.json")}
    assert len(finished) == 1, finished
    checkpoints = {name: sorted(p.name for p in (trials / name).glob("checkpoint_*")) for name in finished}

    out = subprocess.run([LOCALCAP, "sweep", "resume.yaml", "--set", "max_concurrent_trials=2"], cwd=tmp_path, env=_env(tmp_path, prefect_harness), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "2 trials, 1 finished before, 1 to run" in out.stdout + out.stderr
    assert "2 of 2 trials finished" in out.stdout
    assert {name: (trials / name / "result.json").stat().st_mtime_ns for name in finished} == finished  # not rerun
    assert {name: sorted(p.name for p in (trials / name).glob("checkpoint_*")) for name in finished} == checkpoints
    rows = pq.read_table(tmp_path / "sweeps" / "resume" / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["finished"] * 2 and [r["images"] for r in rows] == [6, 12]


@pytest.mark.slow
def test_rerunning_a_finished_sweep_runs_no_trial_and_keeps_the_fit_as_an_artifact(demo_sweep, prefect_harness, ray_local):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.sweep import sweep

    cwd, _, _ = demo_sweep
    cfg = load_sweep_config(SWEEP_DEMO, DEMO_GRID, base=cwd)  # the same config and paths as the fixture's `localcap sweep --demo`
    folder = cwd / "sweep-demo" / "sweeps" / "ci-grid"
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("trials/*/result.json")}
    result = sweep(cfg)
    assert result["ran"] == 0 and len(result["rows"]) == 6
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("trials/*/result.json")} == before
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["localcap-sweep-ci-grid"])))
    text = artifacts[0].data
    assert "6 of 6 trials finished; metric `probe_acc`" in text and str(folder / "index.html") in text
    for group in result["fit"]["groups"]:
        assert f"## mae / {group['model']} (6 trials)" in text and f"Best law `{group['best']}`" in text


@pytest.mark.slow
def test_a_grid_the_dataset_cannot_feed_is_refused_before_any_trial(demo_sweep, tmp_path, prefect_harness):
    cwd, _, _ = demo_sweep
    config = tmp_path / "big.yaml"
    config.write_text(yaml.safe_dump(yaml.safe_load(SWEEP_DEMO.read_text()) | {"dataset": str(cwd / "sweep-demo" / "dataset"), "output": "out"}))
    out = subprocess.run([LOCALCAP, "sweep", "big.yaml", "--set", "grid.images=[6,1000]"], cwd=tmp_path, env=_env(tmp_path, prefect_harness),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "asks for up to 1000 training images but" in out.stderr and "has 28" in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()  # nothing started
    out = subprocess.run([LOCALCAP, "sweep", "big.yaml", "--set", "grid.objective=[local_contrastive]"], cwd=tmp_path,
                         env=_env(tmp_path, prefect_harness), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "built without captions" in out.stderr, out.stderr
