"""Region proposals: the boxes each sample's local captions describe (docs/design.md, "Regions")."""

from __future__ import annotations


class ProposerUnavailable(RuntimeError):
    """The configured proposer cannot run here (an extra, weights or a GPU is missing)."""


def preflight(cfg, ray_started: bool = False) -> None:
    """Fail before any work when the configured proposer's extra or weights are missing, and, once
    Ray is up (`ray_started`), when SAM wants GPUs the cluster does not have."""
    if cfg.method == "ocr":
        from pipeline.regions import ocr

        ocr.check_available()
    elif cfg.method == "salient" and cfg.masks == "sam":
        from pipeline.regions import sam

        sam.check_weights(cfg.sam)
        if ray_started:
            sam.actor_count(cfg.sam)
