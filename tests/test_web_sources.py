"""Web sources end to end: a URL list full of faults and a crawl of a generated site, both through
the real build flow (Ray, Prefect) against local HTTP servers the tests control; per-URL resume."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from pipeline.ingest.crawl import crawl_rows, largest_candidate, parse_page
from pipeline.partitions import read_tables
from pipeline.storage import Storage
from pipeline.synthetic import encode, generate_scene
from schemas.config import CrawlSource, FetchSection
from schemas.tables import IMAGES, REJECTS
from tests.helpers.config import run_config
from tests.helpers.fault_server import JPEG, FaultServer
from tests.helpers.http_server import QuietHandler, serve

FAST = {"allow_loopback": True, "retries": 2, "backoff_s": 0.05, "timeout_s": 1.5, "connect_timeout_s": 1.0,
        "per_host_rate": 100.0}


def _tables(work, run_id):
    ingest = work / run_id / "ingest"
    return (read_tables(Storage(), str(ingest), "part", IMAGES, ["source_uri", "meta"]).to_pylist(),
            read_tables(Storage(), str(ingest), "rejects", REJECTS).to_pylist())


# -- the page parser -----------------------------------------------------------------------------------
def test_largest_candidate_rules():
    assert largest_candidate("s.jpg", ["a.jpg 400w, c.jpg 1600w, b.jpg 800w"]) == "c.jpg"
    assert largest_candidate("s.jpg", ["a.jpg, b.jpg 2x, c.jpg 1.5x"]) == "b.jpg"
    assert largest_candidate("s.jpg", []) == "s.jpg"
    assert largest_candidate(None, ["x.webp 2x", "y.jpg 300w, z.jpg 900w"]) == "z.jpg"  # widths beat densities


def test_parse_page_finds_links_and_images():
    html = """<html><head><base href="/sub/"><meta property="og:image" content="og.jpg">
      <meta name="robots" content="noimageai"></head><body>
      <a href="p.html#top">p</a><a href="mailto:x@y">m</a><a href="https://other.test/q">q</a>
      <img src="i.jpg" srcset="i-1.jpg 100w, i-3.jpg 300w" alt=" Cat ">
      <picture><source srcset="w-1.webp 1x, w-2.webp 2x"><img src="w.jpg" alt="Dog"></picture>
      <img src="i.jpg"></body></html>"""
    page = parse_page(html, "http://site.test/dir/index.html")
    assert page.links == ["http://site.test/sub/p.html", "https://other.test/q"]
    assert page.images == [("http://site.test/sub/og.jpg", "", "og:image"), ("http://site.test/sub/i-3.jpg", "Cat", "srcset"),
                           ("http://site.test/sub/w-2.webp", "Dog", "picture"), ("http://site.test/sub/i.jpg", "", "img")]
    assert page.noimageai and not page.nofollow


# -- a generated site ----------------------------------------------------------------------------------
def _picture(seed: int) -> bytes:
    return encode(generate_scene(seed, 160 + 8 * seed, 120, n_objects=1)[0])


PAGES = {
    "/": '<meta property="og:image" content="/img/og.jpg"><a href="/a.html">a</a> <a href="/b.html#x">b</a>'
         '<a href="/private/secret.html">s</a> <a href="http://offsite.invalid/e.html">e</a>',
    "/a.html": '<img src="/img/a-400.jpg" srcset="/img/a-400.jpg 400w, /img/a-1600.jpg 1600w, /img/a-800.jpg 800w" alt="A lake">'
               '<img src="/private/hidden.jpg" alt="hidden"><a href="/c.html">c</a> <a href="/">home</a>',
    "/b.html": '<picture><source srcset="/img/b-1200.jpg 1200w, /img/b-2400.jpg 2400w"><img src="/img/b.jpg" alt="B"></picture>'
               '<img src="/img/og.jpg">',
    "/c.html": '<img src="/img/c.jpg" srcset="/img/c.jpg 1x, /img/c-2x.jpg 2x"><a href="/d.html">d</a>',
    "/d.html": '<img src="/img/d.jpg">',  # depth 3: beyond max_depth 2
    "/private/secret.html": '<img src="/img/secret.jpg">',
}
IMAGES_ON_SITE = ["og", "a-400", "a-800", "a-1600", "b", "b-1200", "b-2400", "c", "c-2x", "d", "secret"]
EXPECTED = {"/img/og.jpg", "/img/a-1600.jpg", "/img/b-2400.jpg", "/img/c-2x.jpg"}


class Site:
    def __init__(self):
        self.hits: Counter = Counter()
        self.lock = threading.Lock()
        images = {f"/img/{name}.jpg": _picture(i) for i, name in enumerate(IMAGES_ON_SITE)}
        images["/private/hidden.jpg"] = _picture(99)
        outer = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                with outer.lock:
                    outer.hits[self.path] += 1
                if self.path == "/robots.txt":
                    body, ctype = b"User-agent: *\nDisallow: /private/\n", "text/plain"
                elif self.path in PAGES:
                    body, ctype = f"<html><body>{PAGES[self.path]}</body></html>".encode(), "text/html; charset=utf-8"
                elif self.path in images:
                    body, ctype = images[self.path], "image/jpeg"
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd, self.base = serve(Handler)


@pytest.fixture
def site():
    s = Site()
    yield s
    s.httpd.shutdown()


def test_crawl_collects_exactly_the_largest_images(site):
    rows = []
    stats = crawl_rows(CrawlSource(type="crawl", start_urls=[site.base + "/"], max_depth=2),
                       FetchSection(**FAST), 10**7, rows.append, progress=False)
    found = {r["url"].removeprefix(site.base): r for r in rows}
    assert {u for u, r in found.items() if r["skip_reason"] is None} == EXPECTED
    assert found["/private/hidden.jpg"]["skip_reason"] == "robots" and len(found) == len(EXPECTED) + 1
    assert not any(p.startswith("/private/") for p in site.hits)  # neither the page nor the image was requested
    assert "/d.html" not in site.hits and site.hits["/a.html"] == 1  # depth limit; each page once
    assert json.loads(found["/img/a-1600.jpg"]["meta"]) == {"page_url": site.base + "/a.html", "alt": "A lake",
                                                            "found_by": "srcset", "depth": 1}
    assert stats.pages == 4 and stats.pages_disallowed == 1


def test_crawl_through_the_build_flow(build, site, tmp_path):
    work = tmp_path / "work"
    cfg = run_config(tmp_path, [{"type": "crawl", "start_urls": [site.base + "/"], "max_depth": 2}], work=work,
                     fetch=FAST, ingest={"min_side": 64}, regions={"method": "none"}, shards={"keep_empty": True})
    build(cfg, run_id="crawl")
    images, rejects = _tables(work, "crawl")
    assert {i["source_uri"].removeprefix(site.base) for i in images} == EXPECTED
    assert [(r["source_uri"].removeprefix(site.base), r["reason"]) for r in rejects] == [("/private/hidden.jpg", "robots")]
    meta = {i["source_uri"].removeprefix(site.base): json.loads(i["meta"]) for i in images}
    assert meta["/img/b-2400.jpg"]["page_url"] == site.base + "/b.html" and meta["/img/b-2400.jpg"]["alt"] == "B"
    dataset = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert dataset["counts"]["samples"] == len(EXPECTED)


# -- a URL list full of faults, and per-URL resume ---------------------------------------------------------
OUTCOMES = {  # path: (reason or None for an image, retryable)
    "/ok.jpg": (None, False),
    "/429.jpg": (None, False),
    "/500-then-200.jpg": (None, False),
    "/redirect-ok": (None, False),
    "/flaky.jpg": ("http_status", True),
    "/always-503.jpg": ("http_status", True),
    "/slow.jpg": ("timeout", True),
    "/reset.jpg": ("connection_error", True),
    "/loop-a": ("redirects", False),
    "/big.jpg": ("too_large_file", False),
    "/html.jpg": ("not_an_image", False),
    "/404.jpg": ("http_status", False),
    "/noai.jpg": ("opted_out", False),
}


@pytest.fixture
def faults():
    s = FaultServer()
    yield s
    s.close()


def test_url_list_faults_and_per_url_resume(build, faults, tmp_path):
    paths = list(OUTCOMES)
    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,caption,license\n" + "".join(f"{faults.base}{p},caption of {p},cc0\n" for p in paths)
                        + ",a row without a URL,cc0\n")
    work = tmp_path / "work"
    cfg = run_config(tmp_path, [{"type": "urls", "uri": str(url_list)}], work=work,
                     fetch={**FAST, "partition_size": 4}, ingest={"min_side": 64, "max_bytes": len(JPEG) + 1000},
                     regions={"method": "none"}, shards={"keep_empty": True})
    build(cfg, run_id="urls")

    images, rejects = _tables(work, "urls")
    outcome = {i["source_uri"].removeprefix(faults.base): (None, False) for i in images}
    outcome.update({r["source_uri"].removeprefix(faults.base): (r["reason"], r["retryable"]) for r in rejects})
    assert len(images) + len(rejects) == len(paths) + 1  # every row ends exactly once
    assert {p: outcome[p] for p in paths} == OUTCOMES
    bad_row = [r for r in rejects if r["source_uri"].startswith(str(url_list))]
    assert bad_row and bad_row[0]["reason"] == "bad_url"
    assert faults.counts["/always-503.jpg"] == 3 and faults.counts["/404.jpg"] == 1  # retries bounded
    meta = json.loads(next(i["meta"] for i in images if i["source_uri"].endswith("/ok.jpg")))
    assert meta["caption"] == "caption of /ok.jpg" and meta["license"] == "cc0"
    assert json.loads(next(i["meta"] for i in images if i["source_uri"].endswith("/redirect-ok")))["final_url"].endswith("/ok.jpg")

    # Rerun with the same run id: only the URLs that failed with a retryable reason are fetched again.
    faults.healed = True
    before = dict(faults.counts)
    build(cfg, run_id="urls")
    again = {p for p in faults.counts if faults.counts[p] != before.get(p, 0)}
    assert again == {p for p, (_, retryable) in OUTCOMES.items() if retryable}
    images, rejects = _tables(work, "urls")
    assert len(images) + len(rejects) == len(paths) + 1
    assert any(i["source_uri"].endswith("/flaky.jpg") for i in images)
    run = json.loads((work / "urls" / "run.json").read_text())
    ingest = next(s for s in run["stages"] if s["stage"] == "ingest")
    assert 0 < ingest["computed"] < ingest["partitions"]  # partitions without retryable failures were skipped


def test_whole_run_keeps_to_the_per_host_rate(build, faults, tmp_path):
    """Two ingest workers fetch one host at once; the server sees no more than fetch.per_host_rate."""
    url_list = tmp_path / "urls.txt"
    url_list.write_text("".join(f"{faults.base}/rate/{i}.jpg\n" for i in range(24)))
    cfg = run_config(tmp_path, [{"type": "urls", "uri": str(url_list)}],
                     fetch={**FAST, "per_host_rate": 8.0, "partition_size": 6}, ingest={"min_side": 64},
                     regions={"method": "none"}, dedupe={"exact": False, "near": False}, shards={"keep_empty": True})
    build(cfg, run_id="rate")
    times = sorted(t for p, t in faults.hits if p.startswith("/rate/"))
    assert len(times) == 24
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 8 + 2, busiest  # the window's edge and a connection set-up's delay, as in test_fetch
