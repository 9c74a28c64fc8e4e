"""Back ends behind one interface: a batch of CaptionRequests in, one CaptionResult per request out
(text, or an error saying why), in order. Heavy imports happen only in the chosen back end."""

from __future__ import annotations

from typing import Protocol

from captioners.requests import CaptionRequest, CaptionResult
from schemas.config import CaptionerSection


class Backend(Protocol):
    name: str
    model_id: str  # recorded with every caption: id or path, @revision when known

    def caption(self, requests: list[CaptionRequest]) -> list[CaptionResult]: ...

    def close(self) -> None: ...


def make_backend(cfg: CaptionerSection) -> Backend:
    if cfg.backend == "openai":
        from captioners.openai_backend import OpenAIBackend

        return OpenAIBackend(cfg)
    if cfg.backend == "vllm":
        from captioners.vllm_backend import VllmBackend

        return VllmBackend(cfg)
    if cfg.backend == "transformers":
        from captioners.transformers_backend import TransformersBackend

        return TransformersBackend(cfg)
    raise ValueError(f"no back end {cfg.backend!r}")
