"""Behaviour pinned by digests: the demo set and a web-source set, built by the real flow, must give
byte-identical tars, sizes.json, wids indexes, manifest and rejects, and a dataset.json equal but for
times, to the digests recorded in tests/golden/digests.json (first recorded before the Stage/registry
refactor, so the refactor is shown to change no output).

Paths and the HTTP port are fixed (they appear in the manifest and the config), so the sets are
built under /tmp/localcap-golden. Re-record after a deliberate change of output with
`LOCALCAP_RECORD_GOLDEN=1 pytest tests/test_golden.py` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.synthetic import encode, generate_scene, write_demo_images
from schemas.config import load_config, parse_config
from tests.helpers.config import run_config
from tests.helpers.ps3_conformance import dataset_rules, ps3_problems

GOLDEN = Path(__file__).with_name("golden") / "digests.json"
ROOT = Path("/tmp/localcap-golden")
PORT = 47391  # fixed: the URLs are in the manifest
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "flows" / "demo.yaml"
TIME_KEYS = {"finished_at", "created_at", "updated_at", "seconds", "total_seconds", "stage_seconds", "regions_ms_per_image", "nodes", "cpu_seconds"}


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k not in TIME_KEYS}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def dataset_digests(folder: Path) -> dict:
    """sha256 of every file of a dataset folder, and dataset.json without its times."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if rel == "dataset.json":
            out[rel] = _without_times(json.loads(path.read_text()))
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _fresh(name: str) -> Path:
    folder = ROOT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def build_demo_set(build, scene_vlm) -> Path:
    """The README's demo on its first eight generated images (of sixteen): its config, its captioner
    (the shipped scene model)."""
    root = _fresh("demo")
    write_demo_images(root / "images", n=8)
    model = root / "tiny-scenes"
    shutil.copytree(scene_vlm, model)
    cfg = load_config(DEMO_CONFIG, {"sources": [{"uri": str(root / "images")}], "run.work_dir": str(root / "work"),
                                    "shards.output": str(root / "dataset"), "captioner.model": str(model),
                                    "train.output": str(root / "train")})
    build(cfg.model_dump(mode="json"), run_id="golden")
    return root / "dataset"


class _Site(BaseHTTPRequestHandler):
    """Five scenes, one missing image, one HTML page posing as an image."""

    FILES = {f"/img/{i}.jpg": encode(generate_scene(500 + i, 1300 + 40 * i, 1100, n_objects=3)[0]) for i in range(5)}
    FILES["/img/page.jpg"] = b"<html>not an image</html>"
    FILES["/"] = b'<a href="/p.html">p</a><img src="/img/0.jpg">'  # the crawl finds a duplicate of a listed URL's image ...
    FILES["/p.html"] = b'<img src="/img/5.jpg" srcset="/img/5.jpg 1x, /img/6.jpg 2x">'  # ... and a new one
    FILES["/img/6.jpg"] = encode(generate_scene(600, 1500, 1200, n_objects=3)[0])

    def do_GET(self):
        body = self.FILES.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "image/jpeg" if body and body[:2] == b"\xff\xd8" else "text/html")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


def build_web_set(build) -> Path:
    root = _fresh("web")
    server = ThreadingHTTPServer(("127.0.0.1", PORT), _Site)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        urls = [f"http://127.0.0.1:{PORT}/img/{n}.jpg" for n in ("0", "1", "2", "3", "4", "missing", "page")]
        (root / "urls.txt").write_text("\n".join(urls) + "\n")
        cfg = parse_config(run_config(
            root,
            [{"type": "urls", "uri": str(root / "urls.txt")},
             {"type": "crawl", "start_urls": [f"http://127.0.0.1:{PORT}/"], "max_depth": 1}],
            output="dataset", name="golden-web",
            fetch={"allow_loopback": True, "retries": 0, "timeout_s": 5.0},
            ingest={"min_side": 1024, "partition_size": 3},
            dedupe={"near": True},
            shards={"layout": "paired", "max_samples": 2},
        ))
        build(cfg.model_dump(mode="json"), run_id="golden")
    finally:
        server.shutdown()
        server.server_close()
    return root / "dataset"


@pytest.mark.slow
def test_demo_and_web_sets_match_the_golden_digests(build, scene_vlm):
    got = {"demo": dataset_digests(build_demo_set(build, scene_vlm)), "web": dataset_digests(build_web_set(build))}
    for name in got:
        folder = ROOT / name / "dataset"
        assert ps3_problems(folder, seeds=range(20), rules=dataset_rules(folder)) == []
    if os.environ.get("LOCALCAP_RECORD_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"LOCALCAP_RECORD_GOLDEN=1: wrote the digests of this build to {GOLDEN}; nothing was compared")
    want = json.loads(GOLDEN.read_text())
    for name in ("demo", "web"):
        assert sorted(got[name]) == sorted(want[name]), f"{name}: the dataset's files changed"
        for rel in want[name]:
            assert got[name][rel] == want[name][rel], f"{name}: {rel} differs from the golden build"
    assert got["demo"]["dataset.json"]["counts"]["samples"] > 0 and got["web"]["dataset.json"]["counts"]["samples"] > 0
