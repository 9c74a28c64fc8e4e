"""The fetcher against a local HTTP server the test controls: every fault ends as the outcome the
rules say, retries are bounded, and no host sees more than its configured request rate."""

from __future__ import annotations

import time

import pytest

from pipeline.ingest.fetch import (
    fetch_urls,
    retry_after_seconds,
    sniff_image,
)
from schemas.config import FetchSection
from schemas.tables import RejectReason
from tests.helpers.fault_server import JPEG, FaultServer


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


OPTS = FetchSection(allow_loopback=True, retries=2, backoff_s=0.05, timeout_s=1.5, connect_timeout_s=1.0, per_host_rate=50.0)
MAX_BYTES = len(JPEG) + 1000


def test_every_fault_ends_as_the_rules_say(server):
    paths = ["/ok.jpg", "/429.jpg", "/500-then-200.jpg", "/always-503.jpg", "/404.jpg", "/slow.jpg", "/reset.jpg",
             "/loop-a", "/redirect-ok", "/big.jpg", "/html.jpg", "/noai.jpg"]
    start = time.monotonic()
    results = dict(zip(paths, fetch_urls([server.base + p for p in paths], OPTS, MAX_BYTES)))
    assert time.monotonic() - start < 30  # nothing hangs
    assert results["/ok.jpg"].data == JPEG and results["/redirect-ok"].data == JPEG
    assert results["/429.jpg"].ok and results["/429.jpg"].attempts == 2
    assert results["/500-then-200.jpg"].ok and results["/500-then-200.jpg"].attempts == 2
    bad = results["/always-503.jpg"]
    assert bad.reason == RejectReason.HTTP_STATUS and bad.status == 503 and bad.retryable
    assert bad.attempts == 3 and server.counts["/always-503.jpg"] == 3  # retries are bounded
    assert results["/404.jpg"].status == 404 and not results["/404.jpg"].retryable and server.counts["/404.jpg"] == 1
    assert results["/slow.jpg"].reason == RejectReason.TIMEOUT and results["/slow.jpg"].retryable
    assert results["/reset.jpg"].reason == RejectReason.CONNECTION_ERROR and results["/reset.jpg"].retryable
    assert results["/loop-a"].reason == RejectReason.REDIRECTS and "loop" in results["/loop-a"].detail
    assert results["/big.jpg"].reason == RejectReason.TOO_LARGE_FILE and not results["/big.jpg"].retryable
    assert results["/html.jpg"].reason == RejectReason.NOT_AN_IMAGE
    assert results["/noai.jpg"].reason == RejectReason.OPTED_OUT


def test_retry_after_is_honoured(server):
    (r,) = fetch_urls([server.base + "/429.jpg"], OPTS)
    (_, t1), (_, t2) = [h for h in server.hits if h[0] == "/429.jpg"]
    assert r.ok and t2 - t1 >= 0.95


def test_no_host_sees_more_than_its_rate(server):
    opts = FetchSection(allow_loopback=True, per_host_rate=20.0, concurrency=32, per_host_concurrency=16)
    results = fetch_urls([f"{server.base}/rate/{i}.jpg" for i in range(30)], opts)
    assert all(r.ok for r in results)
    times = sorted(t for p, t in server.hits if p.startswith("/rate/"))
    # The server counts: no one-second window holds more than `rate` requests, give or take 2 (the
    # window's edge, and a first request held up by its connection set-up arriving next to the second).
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 20 + 2
    assert times[-1] - times[0] >= 29 / 20 - 0.1


def test_private_addresses_are_refused_unless_allowed(server):
    (r,) = fetch_urls([server.base + "/ok.jpg"], FetchSection())
    assert r.reason == RejectReason.BLOCKED_ADDRESS and not server.hits


def test_sniffing_and_retry_after_parsing():
    assert sniff_image(JPEG[:16]) == "image/jpeg"
    assert sniff_image(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert sniff_image(b"<!doctype html>") is None
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("soon") is None
