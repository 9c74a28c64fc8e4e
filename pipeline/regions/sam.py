"""SAM masks for the salient proposer: transformers' SamModel prompted by a grid of points
("segment everything"), run in long-lived Ray actors that each hold one model on one GPU.

We drive SamModel directly instead of transformers' `mask-generation` pipeline: the pipeline
converts every mask to run-length lists and back, and its final de-duplication imports
torchvision's NMS. Here masks are filtered on the model's own IoU estimate before they are
upsampled, checked for stability, and de-duplicated by a small box NMS in torch.
Weights are never downloaded: `regions.sam.model` must be a local directory or a Hub id already in
the local cache, else the run stops before any work with a message that says so.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.placement import (
    ActorPlacement,
    NoAccelerator,
    gpu_actor_count,
    gpu_actor_resources,
)
from pipeline.regions import ProposerUnavailable
from pipeline.regions.salient import stack_weights
from schemas.config import RegionsSection, SamOptions


class SamUnavailable(ProposerUnavailable):
    """SAM was asked for but cannot run here (extra, weights or GPU missing)."""


def _imports():
    try:
        import torch
        from transformers import SamModel, SamProcessor
    except ImportError as exc:
        raise SamUnavailable(f"regions.masks 'sam' needs the sam extra (torch, transformers): pip install 'localcap[sam]' ({exc})") from None
    return torch, SamModel, SamProcessor


def weights_path(opts: SamOptions) -> str:
    """The local directory or cached Hub id of the weights; SamUnavailable when neither exists."""
    from pipeline.weights import WeightsMissing, local_weights

    try:
        return local_weights(opts.model, "regions.sam.model", "; or use regions.masks: felzenszwalb (CPU)")
    except WeightsMissing as exc:
        raise SamUnavailable(str(exc)) from None


def check_weights(opts: SamOptions) -> None:
    _imports()
    weights_path(opts)


SAM_FIX = "regions.masks 'sam' runs on GPUs: use regions.masks: felzenszwalb, or regions.sam.device: cpu for tiny test models"


def actor_resources(opts: SamOptions) -> dict:
    """Ray options of a SAM actor: one CPU, and regions.sam.num_gpus GPUs on cuda (pipeline/placement.py)."""
    return gpu_actor_resources(opts.device, opts.num_gpus)


def actor_count(opts: SamOptions) -> int:
    """One actor per GPU-worth of the cluster (or regions.sam.actors); a GPU is required unless device
    is cpu (SamUnavailable, a ProposerUnavailable, otherwise)."""
    try:
        return gpu_actor_count(opts.device, opts.num_gpus, opts.actors, None, "regions.sam", SAM_FIX)
    except NoAccelerator as exc:
        raise SamUnavailable(str(exc)) from None


def actor_placement(opts: SamOptions) -> ActorPlacement:
    """The SAM pool: actor_count actors, each asking for actor_resources."""
    return ActorPlacement(actor_count(opts), actor_resources(opts))


def box_nms(boxes, scores, iou_threshold: float):
    """Indices kept by greedy non-maximum suppression (highest score first), in torch."""
    import torch

    order = torch.argsort(scores, descending=True)
    boxes = boxes[order].float()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-9)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in range(len(boxes)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


def mask_boxes(masks):
    """[x1, y1, x2, y2] (half-open) of each boolean mask (n x h x w); empty masks give zeros."""
    import torch

    cols, rows = masks.any(dim=1), masks.any(dim=2)
    w, h = masks.shape[2], masks.shape[1]
    x1 = cols.int().argmax(dim=1)
    x2 = w - cols.flip(1).int().argmax(dim=1)
    y1 = rows.int().argmax(dim=1)
    y2 = h - rows.flip(1).int().argmax(dim=1)
    return torch.stack([x1, y1, x2, y2], dim=1) * masks.flatten(1).any(dim=1, keepdim=True)


class SamMasker:
    """Loads SAM once; called with downscaled RGB pixels, returns the score's per-pixel weight map."""

    def __init__(self, cfg: RegionsSection):
        torch, SamModel, SamProcessor = _imports()
        self.torch, self.cfg, self.opts = torch, cfg, cfg.sam
        path = weights_path(cfg.sam)
        if cfg.sam.device == "cuda" and not torch.cuda.is_available():
            raise SamUnavailable("regions.sam.device is cuda but this worker sees no CUDA GPU")
        self.device = torch.device(cfg.sam.device)
        self.model = SamModel.from_pretrained(path).to(self.device).eval()
        self.processor = SamProcessor.from_pretrained(path).image_processor

    def masks(self, pixels: np.ndarray) -> np.ndarray:
        """Boolean masks (n x h x w) at the size of `pixels`."""
        torch, opts = self.torch, self.opts
        inputs = self.processor(images=Image.fromarray(pixels), return_tensors="pt")
        rh, rw = (int(v) for v in inputs["reshaped_input_sizes"][0])
        n = opts.points_per_crop
        ticks = (np.arange(n) + 0.5) / n
        grid = np.stack(np.meshgrid(ticks * rw, ticks * rh), axis=-1).reshape(-1, 2)
        kept, kept_scores = [], []
        with torch.inference_mode():
            embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device))
            for start in range(0, len(grid), opts.points_per_batch):
                points = torch.tensor(grid[start:start + opts.points_per_batch], dtype=torch.float32, device=self.device)
                out = self.model(image_embeddings=embeddings, input_points=points[None, :, None, :],
                                 input_labels=torch.ones(1, len(points), 1, dtype=torch.long, device=self.device),
                                 multimask_output=True)
                scores = out.iou_scores[0].flatten(0, 1)
                low_res = out.pred_masks[0].flatten(0, 1)
                good = scores > opts.pred_iou_thresh  # filter before the costly upsampling
                if not good.any():
                    continue
                logits = self.processor.post_process_masks(low_res[good][None, :, None].cpu(), inputs["original_sizes"],
                                                           inputs["reshaped_input_sizes"], binarize=False)[0][:, 0]
                stable = (logits > 1.0).flatten(1).sum(1) / (logits > -1.0).flatten(1).sum(1).clamp(min=1)
                ok = stable >= opts.stability_score_thresh
                kept.append(logits[ok] > 0)
                kept_scores.append(scores[good].cpu()[ok])
        if not kept:
            return np.zeros((0, *pixels.shape[:2]), bool)
        masks, scores = torch.cat(kept), torch.cat(kept_scores)
        masks, scores = masks[masks.flatten(1).any(1)], scores[masks.flatten(1).any(1)]
        if len(masks) == 0:
            return np.zeros((0, *pixels.shape[:2]), bool)
        keep = box_nms(mask_boxes(masks), scores, 0.7)
        return masks[keep].numpy()

    def __call__(self, pixels: np.ndarray, pixel_area: float, image_area: float) -> np.ndarray:
        return stack_weights(self.masks(pixels), pixel_area, image_area, self.cfg.mask_floor**2, self.cfg.min_mask_pixels)


def sam_masker(cfg: RegionsSection) -> SamMasker:
    return SamMasker(cfg)
