"""Where model actors run, for every stage that holds a model in long-lived Ray actors (the captioner,
SAM): how many actors, and the Ray options each asks for.

On `device: cuda` an actor asks for its GPUs (and an accelerator type, when one is configured), so
that Ray places it on a GPU node and CPU stages, which ask for none, are not pinned there; the pool
has `actors` actors, else one per GPU-worth of the cluster as it is when the stage starts
(autoscaling from zero GPU nodes would not happen). With too few GPUs, or none of the type asked
for, `NoAccelerator` says which config section to change. On `device: cpu`: one CPU each, `actors`
of them, else one.
"""

from __future__ import annotations

from dataclasses import dataclass


class NoAccelerator(ValueError, RuntimeError):
    """The Ray cluster lacks the GPUs (or the accelerator type) a stage's actors need: a config
    problem no retry fixes (a ValueError, as preflight expects; a RuntimeError, as it always was)."""


@dataclass(frozen=True)
class ActorPlacement:
    count: int  # actors in the pool
    resources: dict  # Ray actor options: num_cpus, and on cuda num_gpus (+ accelerator_type)


def gpu_actor_resources(device: str, num_gpus_per_actor: float, accelerator_type: str | None = None) -> dict:
    """Ray actor options of one actor: one CPU, plus on cuda its GPUs and accelerator type."""
    out: dict = {"num_cpus": 1}
    if device == "cuda":
        out["num_gpus"] = num_gpus_per_actor
        if accelerator_type:
            out["accelerator_type"] = accelerator_type
    return out


def gpu_actor_count(device: str, num_gpus_per_actor: float, max_actors: int | None = None,
                    accelerator_type: str | None = None, what: str = "captioner", fix: str = "") -> int:
    """`max_actors` (the section's `actors`), else one actor per `num_gpus_per_actor` GPUs of the
    running Ray cluster (1 when an actor asks for 0 GPUs), 1 on cpu. On cuda the cluster must have at
    least one GPU, at least one actor's worth, and the accelerator type when one is asked for; else
    NoAccelerator, naming `what` (the config section, e.g. "regions.sam") and ending with `fix`."""
    if device == "cpu":
        return max_actors or 1
    from pipeline.executor import cluster_resources

    resources = cluster_resources()
    gpus = resources.get("GPU", 0)
    missing_type = accelerator_type and not resources.get(f"accelerator_type:{accelerator_type}")
    if gpus < max(num_gpus_per_actor, 1e-9) or missing_type:
        want = f"{num_gpus_per_actor:g} GPU(s)" + (f" of type {accelerator_type}" if accelerator_type else "")
        have = (f"{gpus:g} GPUs" + (f", none of type {accelerator_type}" if missing_type else "")) if gpus else "none"
        raise NoAccelerator(f"{what}.device is cuda and each actor needs {want}, but the Ray cluster has {have}"
                            + (f"; {fix}" if fix else ""))
    if max_actors:
        return max_actors
    return max(1, int(gpus // num_gpus_per_actor)) if num_gpus_per_actor else 1

