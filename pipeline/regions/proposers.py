"""One proposer per `regions.method`, all with the same call:
(stored bytes, width, height, thumbnail) -> Proposal. The stored bytes may be None for a proposer
whose `needs_image(thumb_side)` is False: it works from ingest's thumbnail alone.

A proposer never raises for a bad image: every image leaves with boxes, or with zero boxes and a
reason (NoBoxReason). Set-up problems (a missing extra, missing SAM weights) raise when the
proposer is built, before any partition runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from pipeline.regions import distinct, learned, ocr, tiles
from pipeline.regions.boxes import check_boxes
from pipeline.regions.salient import (
    Proposal,
    label_weights,
    segmentation_copy,
    thumb_covers,
    timed,
    top_boxes,
)
from schemas.config import RegionsSection
from schemas.tables import NoBoxReason

# A mask back end: (downscaled RGB pixels, original-pixel area of one of them, image area) -> weight map.
Masker = Callable[[np.ndarray, float, float], np.ndarray]


class Proposer(Protocol):
    method: str

    def needs_image(self, thumb_side: int) -> bool:
        """Whether the full stored image must be read (the thumbnail is too small for this proposer)."""
        ...

    def __call__(self, data: bytes | None, width: int, height: int, thumb: bytes | None = None) -> Proposal: ...


def felzenszwalb_masker(cfg: RegionsSection) -> Masker:
    from skimage.segmentation import felzenszwalb

    opts = cfg.felzenszwalb

    def weights(pixels: np.ndarray, pixel_area: float, image_area: float) -> np.ndarray:
        labels = felzenszwalb(pixels, scale=opts.scale, sigma=opts.sigma, min_size=opts.min_size)
        return label_weights(labels, pixel_area, image_area, cfg.mask_floor**2, cfg.min_mask_pixels)

    return weights


class SalientProposer:
    """PS3's boxes: segment a downscaled copy, score the grid, keep the top k that do not overlap."""

    method = "salient"

    def __init__(self, cfg: RegionsSection, masker: Masker, downscale: int):
        self.cfg, self.masker, self.downscale = cfg, masker, downscale

    def needs_image(self, thumb_side: int) -> bool:
        return not thumb_covers(thumb_side, self.downscale)

    def __call__(self, data: bytes | None, width: int, height: int, thumb: bytes | None = None) -> Proposal:
        cfg, t = self.cfg, {}
        side = cfg.grid_fraction * min(width, height)
        if side < cfg.min_box_side:
            return Proposal.empty(NoBoxReason.TOO_SMALL, f"box side {side:.0f} px < regions.min_box_side = {cfg.min_box_side}")
        with timed(t, "decode"):
            pixels, sx, sy = segmentation_copy(data, thumb, width, height, self.downscale)
        with timed(t, "segment"):
            weights = self.masker(pixels, sx * sy, float(width) * height)
        with timed(t, "score"):
            proposal = top_boxes(weights, width, height, sx, sy, cfg.k, cfg.grid_fraction, cfg.stride_fraction, cfg.min_score)
        proposal.timings = t
        return proposal


class DistinctProposer:
    """Salient boxes by the 'distinct' score (pipeline/regions/distinct.py), from ingest's thumbnail."""

    method = "salient"

    def __init__(self, cfg: RegionsSection):
        self.cfg = cfg

    def needs_image(self, thumb_side: int) -> bool:
        return not thumb_covers(thumb_side, self.cfg.downscale)

    def __call__(self, data: bytes | None, width: int, height: int, thumb: bytes | None = None) -> Proposal:
        cfg, opts, t = self.cfg, self.cfg.distinct, {}
        side = min(opts.box_scales) * min(width, height)
        if side < cfg.min_box_side:
            return Proposal.empty(NoBoxReason.TOO_SMALL, f"smallest box side {side:.0f} px < regions.min_box_side = {cfg.min_box_side}")
        with timed(t, "decode"):
            pixels, sx, sy = segmentation_copy(data, thumb, width, height, cfg.downscale)
        with timed(t, "segment"):
            if cfg.scoring == "learned":
                boxes, scores = learned.learned_boxes(pixels, opts, cfg.k, cfg.felzenszwalb.sigma)
            else:
                boxes, scores = distinct.distinct_boxes(pixels, opts, cfg.k, cfg.felzenszwalb.sigma)
        with timed(t, "score"):
            if len(boxes) == 0:
                why = (f"no candidate box reaches the box scorer's threshold {learned.load_model()['threshold']:.3f} "
                       "(its min_score: pipeline/regions/box_scorer.json)" if cfg.scoring == "learned"
                       else f"no box holds regions.distinct.min_score = {opts.min_score} of distinct segments")
                return Proposal.empty(NoBoxReason.TOO_PLAIN, why, t)
            out = np.rint(boxes * [sx, sy, sx, sy]).astype(np.int64)
            out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
            out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
            check_boxes(out, width, height)
        return Proposal(out, scores.astype(np.float32), timings=t)


class TilesProposer:
    method = "tiles"

    def __init__(self, cfg: RegionsSection):
        self.opts = cfg.tiles

    def needs_image(self, thumb_side: int) -> bool:
        return False

    def __call__(self, data: bytes | None, width: int, height: int, thumb: bytes | None = None) -> Proposal:
        boxes, scales = tiles.pyramid_tiles(width, height, self.opts.tile, self.opts.scales)
        if len(boxes) == 0:
            return Proposal.empty(NoBoxReason.TOO_SMALL, f"{width}x{height} is smaller than the smallest tile ({self.opts.tile} px)")
        return Proposal(boxes, scales)


class OcrProposer:
    method = "ocr"

    def __init__(self, cfg: RegionsSection):
        self.opts = cfg.ocr
        ocr.check_available()

    def needs_image(self, thumb_side: int) -> bool:
        return True  # text lines need the page near the detector's input size

    def __call__(self, data: bytes | None, width: int, height: int, thumb: bytes | None = None) -> Proposal:
        t: dict[str, float] = {}
        with timed(t, "segment"):
            boxes = ocr.text_line_boxes(data, width, height, self.opts.max_side, self.opts.min_height)
        if len(boxes) == 0:
            return Proposal.empty(NoBoxReason.NO_TEXT, "the text detector found no lines", t)
        return Proposal(boxes, np.ones(len(boxes), np.float32), timings=t)


def make_proposer(cfg: RegionsSection) -> Proposer:
    if cfg.method == "tiles":
        return TilesProposer(cfg)
    if cfg.method == "ocr":
        return OcrProposer(cfg)
    if cfg.method == "salient" and cfg.masks == "sam":
        from pipeline.regions import sam

        return SalientProposer(cfg, sam.sam_masker(cfg), cfg.sam.downscale)
    if cfg.method == "salient" and cfg.scoring in ("distinct", "learned"):
        return DistinctProposer(cfg)
    if cfg.method == "salient":
        return SalientProposer(cfg, felzenszwalb_masker(cfg), cfg.downscale)
    raise ValueError(f"no proposer for regions.method {cfg.method!r}")


def propose_safely(proposer: Proposer, data: bytes | None, width: int, height: int, thumb: bytes | None = None) -> Proposal:
    """The proposer's answer, or zero boxes with the error as the reason: one bad image must not
    fail its partition."""
    try:
        return proposer(data, width, height, thumb)
    except Exception as exc:
        return Proposal.empty(NoBoxReason.ERROR, f"{type(exc).__name__}: {exc}")
