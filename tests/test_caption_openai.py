"""The openai back end against a local HTTP server the test controls: retries with backoff on 429
(Retry-After) and 5xx, no retry on other 4xx, bounded attempts; and a rerun of a run whose server
failed captions only what failed."""

from __future__ import annotations

import json
import threading
import time

import pytest

from captioners.openai_backend import OpenAIBackend
from captioners.requests import CaptionRequest
from pipeline.synthetic import encode, generate_scene
from schemas.config import CaptionerSection
from tests.helpers.config import run_config
from tests.helpers.http_server import QuietHandler, serve


class FakeChatServer:
    """/v1/chat/completions answering from a script: a list of (status, headers) to play first,
    then 200 with a caption naming the request's number. Counts every request."""

    def __init__(self):
        self.script: list[tuple[int, dict]] = []
        self.fail_always = False
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.delay = 0.0
        self.in_flight = self.max_in_flight = 0
        outer = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(body)
                    n = len(outer.requests)
                    status, headers = outer.script.pop(0) if outer.script else ((500, {}) if outer.fail_always else (200, {}))
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                time.sleep(outer.delay)
                with outer.lock:
                    outer.in_flight -= 1
                payload = (json.dumps({"choices": [{"message": {"content": f"A red sign number {n} on a wall."}}],
                                       "usage": {"prompt_tokens": 50, "completion_tokens": 9}})
                           if status == 200 else json.dumps({"error": "scripted"}))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

        self.httpd, root = serve(Handler)
        self.base_url = root + "/v1"

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = FakeChatServer()
    yield s
    s.close()


def _request(i: int = 0) -> CaptionRequest:
    img = generate_scene(i, 320, 240, n_objects=1)[0]
    return CaptionRequest("u", i, [0, 0, 10, 10], [img, img.crop((0, 0, 100, 100))], "describe")


def _backend(server, **openai) -> OpenAIBackend:
    return OpenAIBackend(CaptionerSection(backend="openai", model="served", openai={"base_url": server.base_url, "backoff_s": 0.05, **openai}))


def test_retries_429_and_5xx_then_succeeds(server):
    server.script = [(429, {"Retry-After": "0.3"}), (503, {}), (500, {})]
    start = time.perf_counter()
    (result,) = _backend(server).caption([_request()])
    assert result.error is None and result.text.startswith("A red sign") and result.n_tokens == 9 and result.prompt_tokens == 50
    assert len(server.requests) == 4 and time.perf_counter() - start >= 0.3  # Retry-After was honoured
    body = server.requests[0]
    assert body["model"] == "served" and body["temperature"] == 0.0
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"] and parts[0]["image_url"]["url"].startswith("data:image/jpeg")


def test_other_4xx_fail_at_once_and_retries_are_bounded(server):
    server.script = [(400, {})]
    (bad,) = _backend(server).caption([_request()])
    assert bad.text is None and "HTTP 400" in bad.error and len(server.requests) == 1
    server.requests.clear()
    server.fail_always = True
    (failed,) = _backend(server, max_retries=2).caption([_request()])
    assert "HTTP 500" in failed.error and "after 3 attempts" in failed.error and len(server.requests) == 3


def test_unreachable_server_is_an_error_result_not_an_exception():
    backend = OpenAIBackend(CaptionerSection(backend="openai", model="m",
                                             openai={"base_url": "http://127.0.0.1:9/v1", "max_retries": 1, "backoff_s": 0.01}))
    results = backend.caption([_request(0), _request(1)])
    assert all(r.text is None and "ConnectError" in r.error for r in results)


def test_concurrency_is_bounded(server):
    server.delay = 0.1
    results = _backend(server, concurrency=3).caption([_request(i) for i in range(10)])
    assert all(r.error is None for r in results)
    assert server.max_in_flight == 3  # requests did overlap, never more than the bound


def test_rerun_captions_only_what_failed(server, build, tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(encode(generate_scene(60 + i, 1400, 1100, n_objects=2)[0]))
    cfg = run_config(tmp_path, ingest={"partition_size": 2}, regions={"k": 2},
                     captioner={"backend": "openai", "model": "served", "batch_size": 4,
                                "openai": {"base_url": server.base_url, "max_retries": 0, "concurrency": 2}})
    server.script = [(200, {})] * 4 + [(500, {})] * 3  # the first 4 succeed, the next 3 fail (no retries)
    first = build(cfg, run_id="rerun")
    total = first["captions"]["total"]
    assert 3 * (1 + 1) <= total <= 3 * (2 + 1)  # 1-2 boxes (regions.k = 2) + 1 global caption per image
    failed = first["captions"]["by_status"].get("backend_error", 0)
    assert failed == 3 and first["captions"]["by_status"]["ok"] == total - 3
    sent_first = len(server.requests)

    second = build(cfg, run_id="rerun")
    assert len(server.requests) - sent_first == failed  # only the failed requests were sent again
    assert second["captions"]["by_status"] == {"ok": total}
    manifest_boxes = second["statistics"]["boxes_per_image"]
    assert 1 <= manifest_boxes["min"] <= manifest_boxes["max"] <= 2
