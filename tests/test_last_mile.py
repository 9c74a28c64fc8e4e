"""What a user meets first: relative paths, errors found before anything starts, samples PS3 can
train on, and build records that survive a rerun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.shards.stage import SampleRules, build_sample, unfit_reason
from schemas.config import ShardsSection, load_config
from tests.helpers.config import deep_merge, run_config
from tests.helpers.images import scene_jpeg
from tests.helpers.prefect_home import prefect_home

ROOT = Path(__file__).resolve().parents[1]


def localcap(*args: str, cwd: Path, home: Path, timeout: int = 600, env: dict | None = None,
             api: str | None = None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: its own process and Ray, from `cwd`; Prefect in ephemeral mode, or
    the session's server at `api`."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    full.update({"PREFECT_HOME": prefect_home(home / "prefect-home"), **({"PREFECT_API_URL": api} if api else {}), **(env or {})})
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


# -- paths ---------------------------------------------------------------------------------------
def test_load_config_makes_every_local_path_absolute_against_the_callers_directory(tmp_path, monkeypatch):
    (tmp_path / "models" / "vlm").mkdir(parents=True)
    cfg_file = tmp_path / "cfg" / "run.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text("sources: [{uri: imgs}, {uri: 'more/**/*.jpg'}, {uri: 's3://b/p'}]\nshards: {output: ds}\n"
                        "captioner: {backend: transformers, model: models/vlm}\ndedupe: {index: ../idx}\n"
                        "train: {output: ~/train}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("cfg/run.yaml"), {"publish.to": "published"})
    assert [s.uri for s in cfg.sources] == [str(tmp_path / "imgs"), str(tmp_path / "more/**/*.jpg"), "s3://b/p"]
    assert cfg.shards.output == str(tmp_path / "ds") and cfg.run.work_dir == str(tmp_path / "localcap-work")
    assert cfg.publish.to == str(tmp_path / "published") and cfg.dedupe.index == str(tmp_path.parent / "idx")
    assert cfg.captioner.model == str(tmp_path / "models" / "vlm") and cfg.train.output == str(Path.home() / "train")
    # A Hub id that is not a local folder stays a Hub id.
    hub = load_config(Path("cfg/run.yaml"), {"captioner.model": "Qwen/Qwen2-VL-2B-Instruct"})
    assert hub.captioner.model == "Qwen/Qwen2-VL-2B-Instruct"


@pytest.mark.slow
def test_run_with_relative_paths_from_another_directory_builds_and_trains_there(tmp_path, prefect_harness):
    """`localcap run` from a working directory that is not the checkout, every path relative: the
    dataset and the checkpoint land where the paths say (the Ray Train worker once resolved the
    dataset in its own directory)."""
    here = tmp_path / "project"
    (here / "photos").mkdir(parents=True)
    for i in range(3):
        (here / "photos" / f"{i}.jpg").write_bytes(scene_jpeg(300 + i, 1400, 1100))
    (here / "configs").mkdir()
    (here / "configs" / "rel.yaml").write_text(
        "run: {work_dir: work}\nsources: [{uri: photos}]\nregions: {k: 2}\nshards: {output: out/dataset, max_samples: 2}\n"
        "train: {objective: mae, preset: tiny, output: out/train, steps: 2, batch_size: 2, checkpoint_every: 2, warmup_steps: 0,"
        " data: {loader_workers: 0, shuffle_buffer: 0}}\n")
    out = localcap("run", "configs/rel.yaml", "--run-id", "rel", "--train", "--no-progress", cwd=here, home=tmp_path,
                   api=prefect_harness)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    dataset = json.loads((here / "out" / "dataset" / "dataset.json").read_text())
    assert dataset["counts"]["samples"] == 3 and dataset["config"]["shards"]["output"] == str(here / "out" / "dataset")
    assert (here / "work" / "rel" / "run.json").is_file()
    metrics = json.loads(next((here / "out" / "train").glob("*/metrics.json")).read_text())
    assert metrics["step"] == 2 and Path(metrics["checkpoint"]).is_relative_to(here / "out" / "train")
    assert not (ROOT / "out").exists() and not (ROOT / "work").exists()
    assert not ray_lines(out.stdout + out.stderr), ray_lines(out.stdout + out.stderr)[:5]  # Ray's own lines stay out
    # --verbose shows them: a rerun that trains two more steps prints the Ray task's own lines.
    out = localcap("--verbose", "run", "configs/rel.yaml", "--run-id", "rel", "--train", "--no-progress", "--set", "train.steps=4",
                   cwd=here, home=tmp_path, api=prefect_harness)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert ray_lines(out.stdout + out.stderr), (out.stdout + out.stderr)[-3000:]


def ray_lines(output: str) -> list[str]:
    """The lines a Ray process printed through the driver: `(train_task pid=123) ...`, `(RayTrainWorker pid=...)`."""
    return [line for line in output.splitlines() if re.search(r"\(\w+ pid=\d+", line)]


# -- fail fast -----------------------------------------------------------------------------------
def _fail_fast_cases(tmp_path: Path, s3_endpoint: str, s3_bucket: str, tiny_model_dir: Path) -> dict:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "a-file").write_text("in the way")

    def ok(**fields) -> dict:
        """A config that passes the checks, with one field or section changed."""
        return run_config(tmp_path, "imgs", **fields)

    return {
        "missing source": (run_config(tmp_path, "nowhere"), {}, "does not exist"),
        "output is a file": (ok(output="a-file"), {}, "is a file"),
        "work dir under a file": (ok(work="a-file/work"), {}, "is a file"),
        "missing bucket": (ok(output="s3://no-such-bucket-here/ds"), {"AWS_ENDPOINT_URL": s3_endpoint},
                           "does not exist"),
        "unreachable endpoint": (ok(work=f"s3://{s3_bucket}/work", storage={"endpoint_url": "http://127.0.0.1:9"}),
                                 {}, "cannot reach"),
        "captioner on missing GPUs": (ok(captioner={"backend": "transformers", "model": str(tiny_model_dir), "device": "cuda"}),
                                      {"CUDA_VISIBLE_DEVICES": ""}, "GPU"),
        "weights not cached": (ok(captioner={"backend": "vllm", "model": "someone/not-cached-model", "device": "cpu"}),
                               {"HF_HOME": str(tmp_path / "hf")}, "local Hugging Face cache"),
    }


@pytest.mark.slow
def test_fail_fast_cases_exit_2_with_one_line_before_ray_or_prefect_start(tmp_path, s3_endpoint, s3_bucket):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    ray_tmp = Path(tempfile.mkdtemp(prefix="lc-ray-")) / "t"  # Ray's socket paths must stay short
    for name, (config, env, expected) in _fail_fast_cases(tmp_path, s3_endpoint, s3_bucket, model).items():
        env = {**env, "RAY_TMPDIR": str(ray_tmp)}
        cfg = tmp_path / f"{name.replace(' ', '-')}.yaml"
        cfg.write_text(json.dumps(config))
        start = time.perf_counter()
        out = localcap("run", str(cfg), cwd=tmp_path, home=tmp_path, timeout=120, env=env)
        took = time.perf_counter() - start
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2, (name, out.stdout[-2000:], out.stderr[-2000:])
        assert len(lines) == 1 and expected in lines[0], (name, lines)
        assert "temporary server" not in out.stdout + out.stderr, name  # Prefect never started
        assert not ray_tmp.exists(), name  # nor Ray: no session folder
        assert took < 30, (name, took)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "work").exists()


def test_errors_a_retry_cannot_fix_are_not_retried():
    from flows.build import retryable

    class State:
        def __init__(self, data):
            self.data = data

    assert not retryable(None, None, State(FileNotFoundError("gone")))
    assert not retryable(None, None, State(ValueError("bad value")))
    assert retryable(None, None, State(ConnectionError("reset")))
    assert retryable(None, None, State(TimeoutError()))


# -- the PS3 contract ----------------------------------------------------------------------------
RULES = SampleRules(ShardsSection(output="x"), need_global=True)


@pytest.mark.parametrize("boxes, captions, reason", [
    ([], {-1: "A street."}, "no_boxes"),  # regions found nothing
    ([[0, 0, 10, 10]], {-1: "A street."}, "no_boxes"),  # its only caption was rejected
    ([[0, 0, 10, 10]], {0: "A red door.", 1: "unused"}, "no_global_caption"),
    ([[0, 0, 10, 10]], {0: "A red door.", -1: "A street."}, None),
])
def test_samples_ps3_cannot_train_on_get_a_reason(boxes, captions, reason):
    sample = build_sample(RULES, boxes, 100, 100, captions)
    got = unfit_reason(sample, captioned=True, need_global=True)
    assert (got.value if got else None) == reason


def test_boxes_only_samples_need_a_box_but_no_caption():
    sample = build_sample(RULES, [[0, 0, 10, 10]], 100, 100, None)
    assert sample.text == [""] and unfit_reason(sample, captioned=False, need_global=False) is None
    assert unfit_reason(build_sample(RULES, [], 100, 100, None), captioned=False, need_global=False).value == "no_boxes"


@pytest.mark.slow
def test_no_box_images_are_rejects_and_a_noop_rerun_keeps_the_build_record(build, tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(2):
        (tmp_path / "img" / f"scene{i}.jpg").write_bytes(scene_jpeg(700 + i, 1400, 1100))
    # Big enough for ingest, too small for a box (a fifth of 150 px is under regions.min_box_side).
    (tmp_path / "img" / "small.jpg").write_bytes(scene_jpeg(709, 200, 150))
    cfg = run_config(tmp_path, ingest={"partition_size": 2, "min_side": 100},
                     captioner={"vllm": {"env": {"HF_TOKEN": "hf_do_not_record_me"}}})
    first = build(cfg, run_id="rec")
    c = first["counts"]
    assert c["samples"] == 2 and c["rejected_by_reason"] == {"no_boxes": 1} and c["inputs"] == c["samples"] + c["rejected"]
    rejects = pq.read_table(tmp_path / "ds" / "rejects.parquet").to_pylist()
    assert [(r["source_uri"].rsplit("/", 1)[1], r["stage"], r["reason"]) for r in rejects] == [("small.jpg", "shard", "no_boxes")]

    second = build(cfg, run_id="rec")
    on_disk = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert second["counts"] == first["counts"] == on_disk["counts"]
    assert on_disk["timings"]["stage_seconds"] == first["timings"]["stage_seconds"]  # the no-op added nothing
    assert first["timings"]["stage_seconds"]["ingest"] > 0 and on_disk["created_at"] == first["created_at"]
    assert [b["computed"] for b in on_disk["builds"]] == [first["builds"][0]["computed"], 0]
    assert all(st["skipped"] == st["partitions"] for st in on_disk["builds"][1]["stages"])
    run_text = (tmp_path / "work" / "rec" / "run.json").read_text()
    run = json.loads(run_text)
    assert len(run["builds"]) == 2
    # Records and published files hold the config with credentials redacted, and no raw command line.
    for text in (run_text, (tmp_path / "ds" / "dataset.json").read_text()):
        assert "hf_do_not_record_me" not in text and '"argv"' not in text
    assert run["config"]["captioner"]["vllm"]["env"]["HF_TOKEN"] == "***"

    kept = build(deep_merge(cfg, {"shards": {"output": str(tmp_path / "ds-all"), "keep_empty": True}}), run_id="rec")
    assert kept["counts"]["samples"] == 3 and kept["counts"]["rejected"] == 0


@pytest.mark.parametrize("width, height, inside, outside", [
    (3072, 1536, [1000, 500, 1300, 800], [0, 0, 300, 300]),  # wider than 4:3: PS3 always sees the centred 2048x1536
    (1536, 3072, [500, 1000, 800, 1300], [0, 2800, 300, 3072]),
    (1600, 1200, [100, 100, 400, 400], [0, 0, 150, 110]),  # in range: only the outer 10% band can be cut away
])
def test_boxes_ps3s_crop_can_cut_away_are_left_out(width, height, inside, outside):
    sample = build_sample(RULES, [inside, outside], width, height, None)
    assert sample.box == [inside]


@pytest.mark.slow
def test_a_stage_that_fails_for_good_is_not_retried_and_ends_with_one_line(tmp_path, prefect_harness):
    """A corrupt file in the published dataset's hash index (its blocked hashes) fails the dedupe
    stage: no retry can fix it, so Prefect does not retry, and the run's last line names the stage
    and the error."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(scene_jpeg(11, 1200, 1100))
    (tmp_path / "published" / "_blocked").mkdir(parents=True)
    (tmp_path / "published" / "_blocked" / "blocked-old.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "run.yaml").write_text("sources: [{uri: imgs}]\nshards: {output: ds}\ndedupe: {index: published}\n"
                                       "prefect: {retries: 2, retry_delay_s: 0}\n")
    out = localcap("run", "run.yaml", "--no-progress", cwd=tmp_path, home=tmp_path, api=prefect_harness)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("localcap: stage dedupe failed: ") and "Parquet" in last, last
    assert "Retrying" not in out.stdout + out.stderr


def test_redact_secrets_keeps_names_and_cuts_values():
    from schemas.config import redact_secrets

    data = {"openai": {"api_key_env": "OPENAI_API_KEY", "base_url": "http://bob:hunter2@h:8000/v1"},
            "env": {"HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "abc", "VLLM_CPU_KVCACHE_SPACE": "1"}, "engine_args": {"api_key": None}}
    assert redact_secrets(data) == {"openai": {"api_key_env": "OPENAI_API_KEY", "base_url": "http://bob:***@h:8000/v1"},
                                    "env": {"HF_TOKEN": "***", "AWS_SECRET_ACCESS_KEY": "***", "VLLM_CPU_KVCACHE_SPACE": "1"},
                                    "engine_args": {"api_key": None}}
