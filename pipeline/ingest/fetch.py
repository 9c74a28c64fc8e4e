"""The HTTP fetcher shared by URL lists and crawls: polite, bounded, and never hanging.

- One httpx.AsyncClient (HTTP/1.1 keep-alive) with a cap on connections overall and per host.
- Per host, request starts are spaced by 1 / `per_host_rate` seconds (a token bucket of size 1), so
  no host sees more than its configured rate, retries included.
- Connection errors, timeouts, 5xx and 429 are retried up to `retries` times with exponential
  backoff and full jitter; Retry-After (seconds or an HTTP date) wins when the server sends it.
- Each attempt has a connect timeout and a deadline for the whole body; bodies are streamed and cut
  off past `max_bytes`; redirects are followed by hand (bounded, loops detected) so that every hop
  is checked against the address policy (no private, loopback or link-local targets unless allowed).
- The Content-Type header is not trusted: the first bytes are sniffed. `X-Robots-Tag: noai` /
  `noimageai` opt-outs are honoured by default.

Every URL ends as a FetchResult: bytes, or a reason from FetchReason with a detail and whether a
later run should try it again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import Enum
from urllib.parse import urljoin, urlsplit

import httpx


class FetchReason(str, Enum):
    HTTP_STATUS = "http_status"  # a final 4xx/5xx (detail: the code)
    TIMEOUT = "timeout"  # connect or whole-body deadline passed on every attempt
    CONNECTION = "connection_error"  # refused, reset, DNS failure on every attempt
    TOO_LARGE = "too_large"  # body (or Content-Length) above max_bytes
    NOT_AN_IMAGE = "not_an_image"  # the bytes are not a known image format, whatever the header says
    OPTED_OUT = "opted_out"  # X-Robots-Tag noai / noimageai
    REDIRECTS = "redirects"  # a redirect loop or more than max_redirects hops
    BLOCKED_ADDRESS = "blocked_address"  # private, loopback or link-local target not allowed
    BAD_URL = "bad_url"  # not http(s), no host


RETRYABLE = {FetchReason.TIMEOUT, FetchReason.CONNECTION}  # and HTTP 429 / 5xx (see FetchResult.retryable)


@dataclass(frozen=True)
class FetchOptions:
    concurrency: int = 64
    per_host_concurrency: int = 8
    per_host_rate: float = 10.0  # requests per second per host
    retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    connect_timeout_s: float = 10.0
    total_timeout_s: float = 60.0
    max_bytes: int = 200 * 2**20
    max_redirects: int = 5
    allow_private: bool = False
    honour_opt_out: bool = True
    user_agent: str = "localcap/0.1 (+https://github.com/localcap)"


@dataclass
class FetchResult:
    url: str
    data: bytes | None = None
    reason: FetchReason | None = None
    detail: str = ""
    status: int | None = None
    final_url: str | None = None
    attempts: int = 0
    headers: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.data is not None

    @property
    def retryable(self) -> bool:
        """Worth trying again in a later run (the failure may be temporary)."""
        if self.reason in RETRYABLE:
            return True
        return self.reason == FetchReason.HTTP_STATUS and self.status is not None and (self.status == 429 or self.status >= 500)


IMAGE_MAGIC = [
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
]


def sniff_image(head: bytes) -> str | None:
    """The image type the first bytes announce, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for magic, kind in IMAGE_MAGIC:
        if head.startswith(magic):
            return kind
    return None


def opted_out(headers: httpx.Headers) -> bool:
    values = ",".join(headers.get_list("x-robots-tag")).lower()
    return any(token.strip() in ("noai", "noimageai") for token in values.replace(":", ",").split(","))


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def address_blocked(host: str) -> bool:
    """True when any address the host resolves to is private, loopback, link-local or reserved."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False  # the request itself will fail with a connection error
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            return True
    return False


class HostGate:
    """Per-host concurrency and request-start spacing (1 / rate seconds)."""

    def __init__(self, concurrency: int, rate: float):
        self.sem = asyncio.Semaphore(concurrency)
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_start = 0.0
        self.lock = asyncio.Lock()

    async def wait_turn(self) -> None:
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


class Fetcher:
    def __init__(self, opts: FetchOptions):
        self.opts = opts
        self.gates: dict[str, HostGate] = {}
        self.total = asyncio.Semaphore(opts.concurrency)

    def gate(self, host: str) -> HostGate:
        if host not in self.gates:
            self.gates[host] = HostGate(self.opts.per_host_concurrency, self.opts.per_host_rate)
        return self.gates[host]

    async def fetch_all(self, urls: list[str]) -> list[FetchResult]:
        o = self.opts
        limits = httpx.Limits(max_connections=o.concurrency, max_keepalive_connections=o.concurrency)
        timeout = httpx.Timeout(o.total_timeout_s, connect=o.connect_timeout_s)
        async with httpx.AsyncClient(limits=limits, timeout=timeout, follow_redirects=False,
                                     headers={"User-Agent": o.user_agent}) as client:
            return await asyncio.gather(*(self.fetch(client, u) for u in urls))

    async def fetch(self, client: httpx.AsyncClient, url: str) -> FetchResult:
        result = FetchResult(url)
        async with self.total:
            for attempt in range(self.opts.retries + 1):
                result = await self._attempt(client, url)
                result.attempts = attempt + 1
                if result.ok or not result.retryable or attempt == self.opts.retries:
                    return result
                wait = retry_after_seconds(result.headers.get("retry-after"))
                if wait is None:
                    wait = random.uniform(0, min(self.opts.max_backoff_s, self.opts.backoff_s * 2**attempt))
                await asyncio.sleep(min(wait, self.opts.max_backoff_s))
        return result

    async def _attempt(self, client: httpx.AsyncClient, url: str) -> FetchResult:
        seen = {url}
        current = url
        for _ in range(self.opts.max_redirects + 1):
            parts = urlsplit(current)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return FetchResult(url, reason=FetchReason.BAD_URL, detail=current)
            if not self.opts.allow_private and address_blocked(parts.hostname):
                return FetchResult(url, reason=FetchReason.BLOCKED_ADDRESS, detail=parts.hostname, final_url=current)
            gate = self.gate(parts.netloc)
            async with gate.sem:
                await gate.wait_turn()
                try:
                    outcome = await asyncio.wait_for(self._get(client, url, current), self.opts.total_timeout_s)
                except (TimeoutError, httpx.TimeoutException) as exc:
                    return FetchResult(url, reason=FetchReason.TIMEOUT, detail=type(exc).__name__, final_url=current)
                except httpx.TransportError as exc:
                    return FetchResult(url, reason=FetchReason.CONNECTION, detail=f"{type(exc).__name__}: {exc}", final_url=current)
            if isinstance(outcome, FetchResult):
                return outcome
            current = urljoin(current, outcome)
            if current in seen:
                return FetchResult(url, reason=FetchReason.REDIRECTS, detail=f"redirect loop at {current}")
            seen.add(current)
        return FetchResult(url, reason=FetchReason.REDIRECTS, detail=f"more than {self.opts.max_redirects} redirects")

    async def _get(self, client: httpx.AsyncClient, url: str, current: str) -> FetchResult | str:
        """The result, or the Location to follow."""
        async with client.stream("GET", current) as resp:
            headers = {k.lower(): v for k, v in resp.headers.items()}
            if resp.is_redirect and "location" in resp.headers:
                return resp.headers["location"]
            if resp.status_code != 200:
                return FetchResult(url, reason=FetchReason.HTTP_STATUS, status=resp.status_code, detail=f"HTTP {resp.status_code}",
                                   final_url=current, headers=headers)
            if self.opts.honour_opt_out and opted_out(resp.headers):
                return FetchResult(url, reason=FetchReason.OPTED_OUT, detail="X-Robots-Tag: " + resp.headers.get("x-robots-tag", ""),
                                   status=200, final_url=current, headers=headers)
            declared = int(resp.headers.get("content-length") or 0)
            if declared > self.opts.max_bytes:
                return FetchResult(url, reason=FetchReason.TOO_LARGE, detail=f"Content-Length {declared} > {self.opts.max_bytes}",
                                   status=200, final_url=current, headers=headers)
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > self.opts.max_bytes:
                    return FetchResult(url, reason=FetchReason.TOO_LARGE, detail=f"body passed {self.opts.max_bytes} bytes",
                                       status=200, final_url=current, headers=headers)
                chunks.append(chunk)
            data = b"".join(chunks)
            if sniff_image(data[:16]) is None:
                return FetchResult(url, reason=FetchReason.NOT_AN_IMAGE,
                                   detail=f"declared {resp.headers.get('content-type', '?')}, bytes start {data[:8]!r}",
                                   status=200, final_url=current, headers=headers)
            return FetchResult(url, data=data, status=200, final_url=current, headers=headers)


def fetch_urls(urls: list[str], opts: FetchOptions | None = None) -> list[FetchResult]:
    """Fetch a batch of URLs (one event loop); results in input order."""
    return asyncio.run(Fetcher(opts or FetchOptions()).fetch_all(urls))
