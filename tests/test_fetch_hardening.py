"""The fetcher's hardening (issue 17, points 5 and 6): the address policy cannot be dodged by DNS
rebinding or by ranges outside "private", loopback-only mode opens nothing else, robots.txt is read
by an RFC 9309 parser (wildcards, `$`, longest match), and one worker's memory stays bounded by
fetch.max_bytes_in_flight however many large bodies are in flight."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import aiohappyeyeballs
import psutil
import pytest
from aiohttp.abc import AbstractResolver

from pipeline.ingest.crawl import crawl_rows
from pipeline.ingest.downloader import fetch_partition
from pipeline.ingest.fetch import AddressPolicy, ByteBudget, Fetcher, fetch_urls
from schemas.config import CrawlSource, FetchSection, IngestSection
from schemas.tables import RejectReason
from tests.helpers.fault_server import JPEG, FaultServer
from tests.helpers.http_server import QuietHandler, serve

FAST = {"retries": 0, "timeout_s": 3.0, "connect_timeout_s": 1.0, "per_host_rate": 100.0}


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


@pytest.fixture
def connections(monkeypatch):
    """Every address the fetcher opens a socket to (aiohttp connects through aiohappyeyeballs);
    anything but 127.0.0.1 is refused here, so a test never reaches out of the machine."""
    seen: list[str] = []
    real = aiohappyeyeballs.start_connection

    async def spy(addr_infos, **kwargs):
        seen.extend(info[4][0] for info in addr_infos)
        if any(info[4][0] != "127.0.0.1" for info in addr_infos):
            raise OSError(f"test: refusing to connect to {[info[4][0] for info in addr_infos]}")
        return await real(addr_infos, **kwargs)

    monkeypatch.setattr(aiohappyeyeballs, "start_connection", spy)
    return seen


class ScriptedResolver(AbstractResolver):
    """A DNS that answers its first lookup with `first` and every later one (any name) with `then`."""

    def __init__(self, first: str, then: str):
        self.first, self.then = first, then
        self.calls: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        address = self.then if self.calls else self.first
        self.calls.append(host)
        return [{"hostname": host, "host": address, "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self):
        pass


def _fetch(urls, cfg, resolver=None, max_bytes=10**7):
    async def go():
        async with Fetcher(cfg, max_bytes, resolver) as fetcher:
            return [await fetcher.fetch(u) for u in urls]
    return asyncio.run(go())


# -- point 5: addresses ------------------------------------------------------------------------------
def test_address_policy_ranges():
    default, loopback, private = (AddressPolicy(FetchSection(**o)) for o in ({}, {"allow_loopback": True}, {"allow_private": True}))
    for address in ("8.8.8.8", "2606:4700::1111"):
        assert default.refusal(address) is None
    for address in ("100.64.0.1", "100.127.255.254", "10.0.0.1", "192.168.1.1", "172.16.0.1", "fc00::1", "192.0.2.1"):
        assert default.refusal(address) and loopback.refusal(address) and private.refusal(address) is None, address
    for address in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert default.refusal(address) and loopback.refusal(address) is None and private.refusal(address) is None, address
    for address in ("169.254.169.254", "fe80::1%eth0", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "0.0.0.0", "224.0.0.1", "ff02::1"):
        assert default.refusal(address) and loopback.refusal(address) and private.refusal(address), address  # never
    assert default.refusal("::ffff:100.64.0.1") and default.refusal("2002:6440:1::1")  # CGNAT inside IPv6 (mapped, 6to4)


def test_dns_rebinding_cannot_reach_the_second_answer(server, connections):
    """The DNS says 127.0.0.1 first, then 169.254.169.254. A fetcher that checks one lookup and
    connects after another would reach the second; this one connects to what it checked."""
    port = server.base.rsplit(":", 1)[1]
    dns = ScriptedResolver("127.0.0.1", "169.254.169.254")
    cfg = FetchSection(allow_loopback=True, **FAST)
    (ok,) = _fetch([f"http://rebind.test:{port}/ok.jpg"], cfg, dns)
    assert ok.ok and ok.data == JPEG
    assert dns.calls == ["rebind.test"]  # resolved once: the check and the connection share the answer
    assert connections == ["127.0.0.1"] and server.counts["/ok.jpg"] == 1

    # A fresh fetcher (no DNS cache) gets the second answer: refused before any connection.
    (again,) = _fetch([f"http://rebind.test:{port}/ok.jpg"], cfg, dns)
    assert again.reason == RejectReason.BLOCKED_ADDRESS and not again.retryable
    assert "169.254.169.254" in again.detail and "link-local" in again.detail
    assert connections == ["127.0.0.1"] and server.counts["/ok.jpg"] == 1  # nothing new was connected to


def test_a_redirect_hop_is_checked_the_same_way(connections):
    """An allowed first hop redirecting to a name that resolves to 100.64.0.1: that hop is refused."""
    dns = ScriptedResolver("100.64.0.1", "100.64.0.1")

    class Redirect(QuietHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "http://cgnat.test/ok.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd, base = serve(Redirect)
    try:
        (r,) = _fetch([base + "/start"], FetchSection(allow_loopback=True, **FAST), dns)
    finally:
        httpd.shutdown()
    assert r.reason == RejectReason.BLOCKED_ADDRESS and r.final_url == "http://cgnat.test/ok.jpg" and "100.64.0.1" in r.detail
    assert dns.calls == ["cgnat.test"] and connections == ["127.0.0.1"]


def test_carrier_grade_nat_is_refused(connections):
    dns = ScriptedResolver("100.64.0.1", "100.64.0.1")
    for cfg in (FetchSection(**FAST), FetchSection(allow_loopback=True, **FAST)):
        literal, named = _fetch(["http://100.64.0.1/a.jpg", "http://cgnat.test/a.jpg"], cfg, dns)
        assert literal.reason == named.reason == RejectReason.BLOCKED_ADDRESS
        assert not literal.retryable and "100.64.0.1" in named.detail
    assert connections == []


def test_loopback_only_mode_refuses_link_local_without_connecting(server, connections):
    cfg = FetchSection(allow_loopback=True, **FAST)
    dns = ScriptedResolver("169.254.169.254", "169.254.169.254")
    results = _fetch(["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/x.jpg", "http://metadata.test/latest/",
                      "http://10.0.0.1/x.jpg", server.base + "/ok.jpg"], cfg, dns)
    assert [r.reason for r in results[:4]] == [RejectReason.BLOCKED_ADDRESS] * 4
    assert results[4].ok  # loopback itself is open
    assert connections == ["127.0.0.1"]
    # allow_private opens intranets, never the metadata service.
    (r,) = _fetch(["http://169.254.169.254/latest/meta-data/"], FetchSection(allow_private=True, **FAST))
    assert r.reason == RejectReason.BLOCKED_ADDRESS and connections == ["127.0.0.1"]


def test_names_are_resolved_off_the_event_loop(server, monkeypatch):
    threads = []
    real = socket.getaddrinfo

    def recording(host, *args, **kwargs):
        threads.append((host, threading.current_thread() is threading.main_thread()))
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    (r,) = fetch_urls([server.base.replace("127.0.0.1", "localhost") + "/ok.jpg"], FetchSection(allow_loopback=True, **FAST))
    assert r.ok
    assert threads and all(not on_loop for host, on_loop in threads if host == "localhost")


# -- point 6: robots.txt -----------------------------------------------------------------------------
ROBOTS = b"""User-agent: *
Disallow: /*.png$
Allow: /img/keep*.png$
Disallow: /*?private
Disallow: /gallery/*/raw/
Disallow: /drafts$
"""
ALLOWED = ["/img/a.jpg", "/img/b.png?v=2", "/img/keep-1.png", "/gallery/2024/c.jpg", "/drafts/d.jpg"]
DISALLOWED = ["/img/b.png", "/photos/x.jpg?private=1", "/gallery/2024/raw/c.jpg"]


def test_robots_wildcards_and_end_anchors(tmp_path):
    hits: Counter = Counter()
    lock = threading.Lock()
    page = "".join(f'<img src="{p}">' for p in ALLOWED + DISALLOWED) + '<a href="/drafts">d</a>'

    class Handler(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            with lock:
                hits[self.path] += 1
            if self.path == "/robots.txt":
                body, ctype = ROBOTS, "text/plain"
            elif self.path in ("/", "/drafts"):
                body, ctype = f"<html><body>{page}</body></html>".encode(), "text/html"
            else:
                body, ctype = JPEG, "image/jpeg"
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd, base = serve(Handler)
    try:
        cfg = FetchSection(allow_loopback=True, **FAST)
        rows = []
        stats = crawl_rows(CrawlSource(type="crawl", start_urls=[base + "/"], max_depth=1), cfg, 10**7, rows.append, progress=False)
        images, rejects = fetch_partition(rows, cfg, IngestSection(min_side=64))
    finally:
        httpd.shutdown()
    fetched = {u.removeprefix(base) for u in images["source_uri"].to_pylist()}
    refused = {u.removeprefix(base): reason for u, reason in zip(rejects["source_uri"].to_pylist(), rejects["reason"].to_pylist())}
    assert fetched == set(ALLOWED)
    assert refused == {p: "robots" for p in DISALLOWED}
    assert not any(hits[p] for p in DISALLOWED)  # never requested
    assert hits["/drafts"] == 0 and stats.pages_disallowed == 1  # `$`: /drafts is disallowed, /drafts/d.jpg is not
    assert all(hits[p] == 1 for p in ALLOWED) and hits["/robots.txt"] == 1


# -- point 5: memory -----------------------------------------------------------------------------------
BODY_MB = 20
SERVER = textwrap.dedent(f"""
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    BODY = b"\\x89PNG\\r\\n\\x1a\\n" + bytes({BODY_MB} * 2**20 - 8)  # starts like a PNG, cannot be decoded
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if "declared" in self.path:
                self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()  # HTTP/1.0 without Content-Length: the body ends when the connection closes
            view = memoryview(BODY)
            for i in range(0, len(BODY), 1 << 20):
                self.wfile.write(view[i:i + (1 << 20)])
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    httpd.daemon_threads = True
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()
""")


@pytest.fixture
def big_server():
    """Serves 20 MB bodies from another process, so that only the fetcher's memory is measured here."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def _peak_rss_while(fn) -> tuple[int, object]:
    """(peak RSS - RSS before, fn's result), sampling this process's RSS every 2 ms."""
    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.002)

    before = me.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], me.memory_info().rss) - before, result


def test_bytes_in_flight_bound_a_workers_memory(big_server):
    """40 bodies of 20 MB (800 MB; half with a Content-Length, half without), 32 requests at once,
    through the ingest worker's own function: with fetch.max_bytes_in_flight = 64 MiB the worker's
    RSS grows by less than 320 MB (64 MiB of bodies, one body being joined, aiohttp's read buffers
    of 2 x 1 MiB per connection, the decoder: ~160 MB measured). Without the bound (a 4 GiB cap) ~580 MB."""
    cap = 64 * 2**20
    cfg = FetchSection(allow_loopback=True, concurrency=32, per_host_concurrency=32, per_host_rate=1000.0,
                       retries=0, timeout_s=60.0, max_bytes_in_flight=cap)
    limits = IngestSection(min_side=64, max_bytes=(BODY_MB + 4) * 2**20)
    fetch_partition([{"url": f"{big_server}/warm-declared.png", "meta": "{}", "skip_reason": None, "skip_detail": None}], cfg, limits)
    rows = [{"url": f"{big_server}/{i}-{'declared' if i % 2 else 'chunked'}.png", "meta": "{}", "skip_reason": None,
             "skip_detail": None} for i in range(40)]
    grown, (images, rejects) = _peak_rss_while(lambda: fetch_partition(rows, cfg, limits))
    assert images.num_rows == 0 and rejects["reason"].to_pylist() == ["decode_error"] * 40  # every body arrived whole
    assert grown < 320 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"


def test_waiting_for_the_budget_is_not_the_deadline():
    """Four 700 KB bodies, a 1 MiB budget, each held 0.5 s after it arrives (as the downloader holds
    one until it is decoded): they come one at a time, the last after ~1.5 s of waiting, and none
    of them times out against timeout_s = 1."""
    body = JPEG + bytes(700_000)

    class Handler(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd, base = serve(Handler)
    cfg = FetchSection(allow_loopback=True, retries=0, timeout_s=1.0, per_host_rate=1000.0, max_bytes_in_flight=2**20)

    async def go():
        async with Fetcher(cfg, 10**7) as fetcher:
            async def one(i):
                async with fetcher.held(f"{base}/{i}.jpg") as result:
                    await asyncio.sleep(0.5)
                    return result, time.monotonic()
            return await asyncio.gather(*(one(i) for i in range(4)))

    start = time.monotonic()
    try:
        done = asyncio.run(go())
    finally:
        httpd.shutdown()
    assert all(r.ok for r, _ in done), [r.detail for r, _ in done]
    assert max(t for _, t in done) - start >= 4 * 0.5 - 0.1  # one at a time: the budget held them back


def test_byte_budget_is_fifo_and_never_overdrawn():
    async def go():
        budget, order, peak = ByteBudget(100), [], [0]

        async def user(name, n, hold):
            got = await budget.acquire(n)
            peak[0] = max(peak[0], budget.capacity - budget.free)
            order.append(name)
            await asyncio.sleep(hold)
            budget.release(got)

        await asyncio.gather(user("a", 60, 0.05), user("b", 60, 0.01), user("c", 10, 0.01), user("huge", 500, 0.01))
        waiter = asyncio.ensure_future(budget.acquire(100))
        blocker = await budget.acquire(1)
        await asyncio.sleep(0)
        waiter.cancel()  # a cancelled waiter leaves the budget as it was
        await asyncio.gather(waiter, return_exceptions=True)
        budget.release(blocker)
        return order, peak[0], budget.free

    order, peak, free = asyncio.run(go())
    assert order == ["a", "b", "c", "huge"]  # c waits behind b: first come, first served
    assert peak <= 100 and free == 100
