"""Back end `openai`: any OpenAI-compatible chat endpoint, with bounded concurrency and retries.

Requests go out concurrently (asyncio + httpx, keep-alive), at most `concurrency` at a time.
Connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter
(Retry-After is honoured); other 4xx fail that request only. A request that still fails comes
back as a CaptionResult with `error`, never as an exception, so one bad request loses nothing else.
"""

from __future__ import annotations

import asyncio
import os
import random

import httpx

from captioners.messages import chat_messages, url_part
from captioners.requests import CaptionRequest, CaptionResult
from schemas.config import CaptionerSection

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIBackend:
    name = "openai"

    def __init__(self, cfg: CaptionerSection):
        self.cfg, self.opts = cfg, cfg.openai
        self.model_id = cfg.model_ref
        self.image_part = url_part(self.opts.image_format)
        key = os.environ.get(self.opts.api_key_env, "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def caption(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        return asyncio.run(self._caption_all(requests))

    async def _caption_all(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        limits = httpx.Limits(max_connections=self.opts.concurrency, max_keepalive_connections=self.opts.concurrency)
        gate = asyncio.Semaphore(self.opts.concurrency)
        async with httpx.AsyncClient(base_url=self.opts.base_url.rstrip("/"), headers=self.headers, limits=limits,
                                     timeout=httpx.Timeout(self.opts.timeout_s, connect=min(10.0, self.opts.timeout_s))) as client:
            return await asyncio.gather(*(self._one(client, gate, r) for r in requests))

    def body(self, request: CaptionRequest) -> dict:
        return {
            "model": self.cfg.model,
            "messages": chat_messages(request, self.image_part),
            "max_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "seed": self.cfg.seed,
        }

    async def _one(self, client: httpx.AsyncClient, gate: asyncio.Semaphore, request: CaptionRequest) -> CaptionResult:
        body = self.body(request)
        error = "not sent"
        for attempt in range(self.opts.max_retries + 1):
            wait = None
            async with gate:
                try:
                    resp = await client.post("/chat/completions", json=body)
                except (httpx.TransportError, httpx.TimeoutException) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                else:
                    if resp.status_code == 200:
                        return _parse(resp.json())
                    error = f"HTTP {resp.status_code}: {resp.text[:300]}"
                    if resp.status_code not in RETRYABLE_STATUS:
                        return CaptionResult(error=error)
                    wait = _retry_after(resp)
            if attempt < self.opts.max_retries:
                backoff = self.opts.backoff_s * 2**attempt
                await asyncio.sleep(wait if wait is not None else backoff * (0.5 + random.random()))
        return CaptionResult(error=f"{error} (after {self.opts.max_retries + 1} attempts)")

    def close(self) -> None:
        pass


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _parse(data: dict) -> CaptionResult:
    try:
        text = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return CaptionResult(error=f"malformed response: {str(data)[:300]}")
    usage = data.get("usage") or {}
    return CaptionResult(text=text, n_tokens=int(usage.get("completion_tokens") or 0),
                         prompt_tokens=int(usage.get("prompt_tokens") or 0))
