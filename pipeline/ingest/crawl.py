"""The web-crawl source: same-site pages to a depth limit, robots.txt honoured, images collected.

Pure parts first (what a page offers: `parse_page`, `largest_candidate`), then the async crawl
that drives the shared Fetcher breadth first. The crawl only *finds* image URLs; they are fetched
later, in the ingest partitions, like a URL list. An image URL that robots.txt disallows is still
emitted, with `skip_reason = robots`, so that it ends in the rejects table with its reason.

Choices worth knowing:
- One image per <img> and per <picture>: the largest candidate among its srcset(s) and src (by
  `w` descriptor, else `x` density). A <picture>'s sources are usually one picture in several
  sizes or formats; taking each would only feed near duplicates to dedupe.
- robots.txt is parsed by protego (RFC 9309: `*` and `$` in paths, the longest match wins, Allow
  wins a tie, the most specific user-agent group applies), for pages and images alike. 4xx means
  "no rules"; an unreachable or 5xx robots.txt means "disallow all" for the crawl (RFC 9309
  §2.3.1.4). Crawl-delay slows that host's request rate further.
- `<meta name="robots">` with nofollow stops link-following from that page; noai / noimageai
  opts its images out (recorded as `opted_out`).
- A start URL that gives no page (refused, timed out, HTTP 4xx/5xx, not HTML, disallowed, or its
  site's robots.txt unreachable) is emitted as a urls row with that reason as `skip_reason`, so it
  ends as a reject naming the start URL, and is logged as a warning: a crawl never ends with
  "0 samples, 0 rejected" and no word why. Other pages that fail are counted and logged (info).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urldefrag, urljoin, urlsplit

from protego import Protego
from tqdm import tqdm

from pipeline.ingest.fetch import Fetcher, FetchResult
from schemas.config import CrawlSource, FetchSection
from schemas.tables import RejectReason

log = logging.getLogger("localcap")


# -- what a page offers --------------------------------------------------------------------------
def parse_srcset(value: str) -> list[tuple[str, float, str]]:
    """(url, size, unit) per candidate; unit 'w' (width descriptor) or 'x' (density, default 1x)."""
    out = []
    for part in value.split(","):
        bits = part.strip().split()
        if not bits:
            continue
        url, size, unit = bits[0], 1.0, "x"
        if len(bits) > 1:
            desc = bits[-1].lower()
            try:
                size, unit = float(desc[:-1]), desc[-1]
            except ValueError:
                pass
        out.append((url, size, unit))
    return out


def largest_candidate(src: str | None, srcsets: list[str]) -> str | None:
    """The largest image among srcsets (width descriptors beat densities) and the plain src (1x)."""
    candidates = [c for s in srcsets for c in parse_srcset(s) if c[2] in ("w", "x")]
    widths = [c for c in candidates if c[2] == "w"]
    if widths:
        return max(widths, key=lambda c: c[1])[0]
    if src:
        candidates.append((src, 1.0, "x"))
    return max(candidates, key=lambda c: c[1])[0] if candidates else None


@dataclass
class PageContent:
    links: list[str] = field(default_factory=list)
    images: list[tuple[str, str, str]] = field(default_factory=list)  # (absolute url, alt, found_by)
    nofollow: bool = False
    noimageai: bool = False


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.links: list[str] = []
        self.images: list[tuple[str, str, str]] = []  # relative url, alt, found_by
        self.picture: dict | None = None  # srcsets of the open <picture>, then its <img>
        self.robots: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "base" and a.get("href") and self.base is None:
            self.base = a["href"]
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "picture":
            self.picture = {"srcsets": []}
        elif tag == "source" and self.picture is not None and a.get("srcset"):
            self.picture["srcsets"].append(a["srcset"])
        elif tag == "img":
            srcsets = [a["srcset"]] if a.get("srcset") else []
            if self.picture is not None:
                url = largest_candidate(a.get("src"), self.picture["srcsets"] + srcsets)
                found_by = "picture"
                self.picture["done"] = True
            else:
                url = largest_candidate(a.get("src"), srcsets)
                found_by = "srcset" if srcsets else "img"
            if url:
                self.images.append((url, a.get("alt", "").strip(), found_by))
        elif tag == "meta":
            prop = (a.get("property") or a.get("name") or "").lower()
            if prop in ("og:image", "og:image:url") and a.get("content"):
                self.images.append((a["content"], "", "og:image"))
            elif prop == "robots":
                self.robots.append(a.get("content", "").lower())

    def handle_endtag(self, tag):
        if tag == "picture" and self.picture is not None:
            if not self.picture.get("done") and self.picture["srcsets"]:  # a <picture> without <img>
                url = largest_candidate(None, self.picture["srcsets"])
                if url:
                    self.images.append((url, "", "picture"))
            self.picture = None


def parse_page(html: str, page_url: str) -> PageContent:
    """Links (absolute, no fragment, http(s) only) and images (absolute, largest candidate) of a page."""
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    base = urljoin(page_url, parser.base) if parser.base else page_url

    def absolute(url: str) -> str | None:
        url = urldefrag(urljoin(base, url.strip()))[0]
        return url if urlsplit(url).scheme in ("http", "https") else None

    tokens = {t.strip() for c in parser.robots for t in c.split(",")}
    content = PageContent(nofollow="nofollow" in tokens or "none" in tokens,
                          noimageai=bool(tokens & {"noai", "noimageai"}))
    seen = set()
    for link in parser.links:
        url = absolute(link)
        if url and url not in seen:
            seen.add(url)
            content.links.append(url)
    seen = set()
    for url, alt, found_by in parser.images:
        url = absolute(url)
        if url and url not in seen:
            seen.add(url)
            content.images.append((url, alt, found_by))
    return content


def site_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# -- robots.txt ------------------------------------------------------------------------------------
class Robots:
    """robots.txt per site, fetched once through the Fetcher (so rates and address rules apply)."""

    def __init__(self, fetcher: Fetcher, user_agent: str, enabled: bool):
        self.fetcher, self.user_agent, self.enabled = fetcher, user_agent, enabled
        self.rules: dict[str, Protego | None] = {}  # None: disallow everything
        self.unreachable: dict[str, FetchResult] = {}  # why a site's rules are None
        self.locks: dict[str, asyncio.Lock] = {}

    async def allowed(self, url: str) -> bool:
        if not self.enabled:
            return True
        site = site_of(url)
        lock = self.locks.setdefault(site, asyncio.Lock())
        async with lock:
            if site not in self.rules:
                self.rules[site] = await self._load(site)
        rules = self.rules[site]
        return rules is not None and rules.can_fetch(url, self.user_agent)

    def why_not(self, url: str) -> tuple[RejectReason, str]:
        """(reason, detail) for a URL `allowed` refused: the robots.txt fetch's own failure when the
        file was unreachable (the site is down: connection_error, timeout, HTTP 5xx), else robots."""
        site = site_of(url)
        failed = self.unreachable.get(site)
        if failed is not None and failed.reason is not None:
            return failed.reason, f"{site}/robots.txt: {failed.detail}; the site is not crawled"
        return RejectReason.ROBOTS, f"disallowed by {site}/robots.txt"

    async def _load(self, site: str) -> Protego | None:
        result = await self.fetcher.fetch(site + "/robots.txt", kind="text")
        if result.ok:
            parser = Protego.parse(result.data.decode("utf-8", "replace"))
            delay = parser.crawl_delay(self.user_agent)
            if delay:
                gate = self.fetcher.gate(urlsplit(site).netloc)
                gate.interval = max(gate.interval, float(delay))
            return parser
        if result.reason == RejectReason.HTTP_STATUS and result.status is not None and 400 <= result.status < 500:
            return Protego.parse("")  # no robots.txt: everything allowed
        log.warning("crawl: robots.txt of %s unreachable (%s); not crawling that site", site, result.detail)
        self.unreachable[site] = result
        return None


# -- the crawl ---------------------------------------------------------------------------------------
@dataclass
class CrawlStats:
    pages: int = 0
    page_errors: int = 0
    pages_disallowed: int = 0
    start_failures: int = 0  # start URLs that gave no page (each is a reject row)
    images: int = 0
    images_disallowed: int = 0


def url_row(url: str, meta: dict, skip: RejectReason | None = None, detail: str | None = None) -> dict:
    """One row of the urls table (schemas.tables.URLS)."""
    return {"url": url, "meta": json.dumps(meta, sort_keys=True), "skip_reason": skip.value if skip else None, "skip_detail": detail}


async def crawl(source: CrawlSource, cfg: FetchSection, max_bytes: int, emit: Callable[[dict], None],
                progress: bool = True) -> CrawlStats:
    """Crawl breadth first and `emit` one urls-table row per image found (each image once)."""
    hosts = {urlsplit(u).netloc for u in source.start_urls} | set(source.allowed_hosts)
    stats = CrawlStats()
    seen_pages: set[str] = set()
    seen_images: set[str] = set()
    level = [urldefrag(u)[0] for u in source.start_urls]
    bar = tqdm(desc="crawl", unit="page", disable=not progress)
    async with Fetcher(cfg, max_bytes) as fetcher:
        robots = Robots(fetcher, cfg.user_agent, source.robots)

        def start_failed(page: str, reason: RejectReason, detail: str) -> list[dict]:
            """The row that makes a start URL which gave no page a reject, with a warning."""
            stats.start_failures += 1
            log.warning("crawl: start URL %s gave no page (%s: %s); nothing is crawled from it", page, reason.value, detail)
            return [url_row(page, {"page_url": page, "found_by": "start_url", "depth": 0}, reason, f"start URL: {detail}")]

        async def visit(page: str, depth: int) -> tuple[list[dict], list[str]]:
            """(urls rows of the page's images, same-site links to follow)."""
            if not await robots.allowed(page):
                stats.pages_disallowed += 1
                return (start_failed(page, *robots.why_not(page)) if depth == 0 else []), []
            result = await fetcher.fetch(page, kind="page")
            bar.update(1)
            if not result.ok:
                stats.page_errors += 1
                if depth == 0:
                    return start_failed(page, result.reason or RejectReason.CONNECTION_ERROR, result.detail), []
                log.info("crawl: page %s: %s %s", page, result.reason.value if result.reason else "", result.detail)
                return [], []
            content = parse_page(result.data.decode("utf-8", "replace"), result.final_url or page)
            rows = []
            for url, alt, found_by in content.images:
                meta = {"page_url": page, "found_by": found_by, "depth": depth, **({"alt": alt} if alt else {})}
                if content.noimageai and cfg.honour_opt_out:
                    rows.append(url_row(url, meta, RejectReason.OPTED_OUT, f'<meta name="robots"> on {page}'))
                elif not await robots.allowed(url):
                    rows.append(url_row(url, meta, RejectReason.ROBOTS, f"disallowed by {site_of(url)}/robots.txt"))
                else:
                    rows.append(url_row(url, meta))
            return rows, [] if content.nofollow else [u for u in content.links if urlsplit(u).netloc in hosts]

        for depth in range(source.max_depth + 1):
            level = [p for p in dict.fromkeys(level) if p not in seen_pages][: max(0, source.max_pages - len(seen_pages))]
            if not level:
                break
            seen_pages.update(level)
            found = await asyncio.gather(*(visit(p, depth) for p in level))
            # Emitted in page order, not completion order: the same site gives the same partitions.
            for rows, _ in found:
                for row in rows:
                    if row["url"] not in seen_images:
                        seen_images.add(row["url"])
                        stats.images += row["skip_reason"] is None
                        stats.images_disallowed += (row["skip_reason"] == RejectReason.ROBOTS.value
                                                    and json.loads(row["meta"])["found_by"] != "start_url")
                        emit(row)
            level = [u for _, links in found for u in links]
        stats.pages = len(seen_pages) - stats.pages_disallowed
    bar.close()
    return stats


def crawl_rows(source: CrawlSource, cfg: FetchSection, max_bytes: int, emit: Callable[[dict], None],
               progress: bool = True) -> CrawlStats:
    return asyncio.run(crawl(source, cfg, max_bytes, emit, progress))
