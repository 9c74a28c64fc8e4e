"""A k-NN probe on frozen features: what a trained representation knows, not how well it reconstructs.

Labelled regions come from one of two places (schemas.train.ProbeOptions.task):
- scenes: generated labelled scenes (pipeline.synthetic), seeded apart from any training data; each
  planted object is a region with its true box, labelled by its kind (or colour, or both).
- captions: the held-out shards' captioned boxes, labelled by their caption text (for a user's dataset,
  where nothing else is labelled: do a box's features find boxes that carry the same caption?).

A region's feature is the frozen model's tokens pooled over the region's patches, with the image seen
whole at the run's resolution (so that a low resolution shows a small object in few, blurred patches:
the effect a scaling study measures). The probe is k-NN with cosine similarity, leave-one-image-out:
a region's neighbours come from other images only, so it cannot match an object to its own scene.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from PIL import Image

from pipeline.train.data import Box, box_patch_map, decode_reduced, scale_box, to_tensor_array, views
from schemas.train import ProbeOptions, TrainConfig

@dataclass(frozen=True)
class Region:
    image: int  # index into the probe's images
    box: Box  # in that image's pixels
    label: str


def scene_label(kind: str, colour: str | None, label: str) -> str:
    return {"kind": kind, "colour": colour or "", "kind_colour": f"{colour} {kind}"}[label]


def scene_regions(opts: ProbeOptions) -> tuple[list[Image.Image], list[Region]]:
    """The probe's generated scenes and their planted objects as labelled regions."""
    from pipeline.synthetic import generate_labelled_scene

    images, regions = [], []
    width, height = opts.scene_size
    for i in range(opts.images):
        img, objects = generate_labelled_scene(opts.seed + i, width, height, n_objects=4)
        images.append(img)
        regions += [Region(i, tuple(map(float, o.box)), scene_label(o.kind, o.colour, opts.label)) for o in objects]
    return images, regions


def caption_regions(samples, opts: ProbeOptions, side: int) -> tuple[list[Image.Image], list[Region]]:
    """Held-out samples' captioned boxes as regions labelled by their caption; images decoded at reduced size."""
    images, regions = [], []
    for sample in islice(samples, opts.images):
        pairs = [(b, c) for b, c in zip(sample["boxes"], sample["captions"]) if c]
        if not pairs:
            continue
        img, fx, fy = decode_reduced(sample["image"], side)
        for b, caption in pairs:
            regions.append(Region(len(images), scale_box(b, fx, fy), caption))
        images.append(img)
    return images, regions


def knn_accuracy(features: np.ndarray, labels: list[str], groups: list[int], k: int) -> float | None:
    """Share of regions whose k nearest regions from other images (cosine, similarity-weighted vote)
    carry their label; None when no region has a neighbour in another image."""
    feats = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    sims = feats @ feats.T
    groups_ = np.asarray(groups)
    sims[groups_[:, None] == groups_[None, :]] = -np.inf  # itself and its own image's regions
    hits, counted = 0, 0
    for i in range(len(labels)):
        order = np.argsort(-sims[i])[:k]
        order = order[np.isfinite(sims[i, order])]
        if not len(order):
            continue
        votes: Counter = Counter()
        for j in order:
            votes[labels[j]] += float(sims[i, j]) + 1.0  # cosine in [-1, 1]: weights stay positive
        counted += 1
        hits += votes.most_common(1)[0][0] == labels[i]
    return hits / counted if counted else None


def majority_share(labels: list[str]) -> float:
    """The accuracy of always answering the commonest label: the probe's chance level."""
    return Counter(labels).most_common(1)[0][1] / len(labels) if labels else 0.0


@torch.no_grad()
def mae_region_features(model, images: list[Image.Image], regions: list[Region], side: int, patch: int,
                        batch_size: int, device) -> np.ndarray:
    """ViT-MAE encoder tokens (no masking) of each image at side x side, mean-pooled over each region's patches."""
    config = model.config
    ratio, config.mask_ratio = config.mask_ratio, 0.0  # every patch visible
    by_image: dict[int, list[int]] = {}
    for n, region in enumerate(regions):
        by_image.setdefault(region.image, []).append(n)
    out = np.zeros((len(regions), config.hidden_size), dtype=np.float32)
    try:
        order = sorted(by_image)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            pixels = torch.from_numpy(np.stack([to_tensor_array(images[i].resize((side, side), Image.Resampling.BICUBIC))
                                                for i in chunk])).to(device)
            grid = (side // patch) ** 2
            noise = torch.arange(grid, device=device, dtype=torch.float32).expand(len(chunk), grid)  # keep patch order
            tokens = model.vit(pixel_values=pixels, noise=noise).last_hidden_state[:, 1:].float().cpu()  # without CLS
            for row, i in enumerate(chunk):
                sx, sy = side / images[i].width, side / images[i].height
                for n in by_image[i]:
                    mask = torch.from_numpy(box_patch_map(scale_box(regions[n].box, sx, sy), side, patch).reshape(-1))
                    out[n] = tokens[row][mask].mean(0).numpy()
    finally:
        config.mask_ratio = ratio
    return out


def contrastive_region_features(model, images: list[Image.Image], regions: list[Region], batch_size: int, device) -> np.ndarray:
    """The local-contrastive model's in-box embeddings (evaluate.region_embeddings) of each region."""
    from pipeline.train.evaluate import region_embeddings

    opts = model.opts
    cached: dict[int, dict] = {}
    jobs = []
    for region in regions:
        img = images[region.image]
        if region.image not in cached:
            high, low = views(img, opts.low_res, opts.high_res)
            cached[region.image] = {"high": high, "low": low}
        sx, sy = opts.high_res / img.width, opts.high_res / img.height
        jobs.append((cached[region.image], box_patch_map(scale_box(region.box, sx, sy), opts.high_res, opts.patch_size)))
    return region_embeddings(model, jobs, batch_size, device).numpy()


def probe_metrics(models: dict, cfg: TrainConfig, held_out, device) -> dict:
    """The probe's figures for each of `models` ({suffix: model}; "" is the trained one): probe_acc{suffix}
    (k-NN, leave-one-image-out), and once probe_chance (the commonest label's share), probe_regions,
    probe_classes, probe_task. The labelled regions are made once for all. `held_out`: the evaluation
    samples (the captions task reads them)."""
    opts = cfg.probe
    side = cfg.mae_options().image_size if cfg.objective == "mae" else cfg.model_options().high_res
    if opts.task == "scenes":
        images, regions = scene_regions(opts)
    else:
        images, regions = caption_regions(held_out, opts, side)
    labels = [r.label for r in regions]
    out = {"probe_task": opts.task, "probe_regions": len(regions), "probe_classes": len(set(labels)),
           "probe_chance": majority_share(labels) if regions else None}
    for suffix, model in models.items():
        out[f"probe_acc{suffix}"] = None
        if len({r.image for r in regions}) < 2:
            continue
        model.eval()
        if cfg.objective == "mae":
            features = mae_region_features(model, images, regions, side, cfg.model_options().patch_size, cfg.eval.batch_size, device)
        else:
            features = contrastive_region_features(model, images, regions, cfg.eval.batch_size, device)
        out[f"probe_acc{suffix}"] = knn_accuracy(features, labels, [r.image for r in regions], opts.k)
    return out
