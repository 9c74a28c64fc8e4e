"""Retrieval on held-out images: region <-> caption and global image <-> global caption, recall@1/@5.

Captions repeat (two regions can both be "a red sign"), so retrieval runs over the distinct caption
texts: a region hits when its own caption text is among the top k texts, a caption hits when any of
the top k regions carries it. Every recall is reported beside its chance level.
"""

from __future__ import annotations

import re
from math import prod

import numpy as np
import torch


def recall_keys(metrics: dict) -> list[str]:
    """The recall figures among a run's metrics (`..._r1`, `..._r5`; each has a `_chance` twin), sorted."""
    return sorted(k for k in metrics if re.search(r"_r\d+$", k))


def chance_text(n_texts: int, k: int) -> float:
    return min(1.0, k / n_texts) if n_texts else 0.0


def chance_items(owners: list[str], k: int) -> float:
    """Mean chance, over distinct texts, that k random items include one carrying the text."""
    n = len(owners)
    counts = [owners.count(t) for t in dict.fromkeys(owners)]
    return float(np.mean([1 - prod((n - c - i) / (n - i) for i in range(min(k, n))) for c in counts])) if n else 0.0


def recall(items: torch.Tensor, item_texts: list[str], texts: torch.Tensor, text_names: list[str], item: str, text: str,
           ks=(1, 5)) -> dict:
    """Recall@k both ways between embedded items (one text each) and the distinct texts' embeddings,
    keyed `{item}_to_{text}_r{k}` and `{text}_to_{item}_r{k}`, each with its `_chance`."""
    sims = items @ texts.t()  # items x texts
    truth = torch.tensor([[t == name for name in text_names] for t in item_texts])
    out = {}
    for k in ks:
        top_texts = sims.topk(min(k, sims.shape[1]), dim=1).indices
        out[f"{item}_to_{text}_r{k}"] = truth.gather(1, top_texts).any(1).float().mean().item()
        top_items = sims.t().topk(min(k, sims.shape[0]), dim=1).indices  # texts x k
        out[f"{text}_to_{item}_r{k}"] = truth.t().gather(1, top_items).any(1).float().mean().item()
        out[f"{item}_to_{text}_r{k}_chance"] = chance_text(len(text_names), k)
        out[f"{text}_to_{item}_r{k}_chance"] = chance_items(item_texts, k)
    return out


@torch.no_grad()
def region_embeddings(model, jobs: list[tuple[dict, np.ndarray]], batch_size: int, device) -> torch.Tensor:
    """The local (in-box, high-res) embedding of each (eval view, box patch map), selecting patches
    bottom-up only (no caption asks for them); (len(jobs), embed_dim) on the CPU."""
    out, zero_text = [], None
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        low = torch.from_numpy(np.stack([v["low"] for v, _ in chunk])).to(device)
        high = torch.from_numpy(np.stack([v["high"] for v, _ in chunk])).to(device)
        maps = torch.from_numpy(np.stack([m for _, m in chunk])).to(device)
        if zero_text is None or zero_text.shape[0] != len(chunk):
            zero_text = torch.zeros(len(chunk), model.opts.embed_dim, device=device)
        local, _, _, _ = model.region_features(low, high, maps, zero_text)
        out.append(local.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def retrieval_metrics(model, views: list[dict], encode_texts, batch_size: int, device) -> dict:
    """Region->caption, caption->region and global retrieval over eval views (data.eval_view)."""
    model.eval()
    globals_, global_texts = [], []
    jobs = [(v, m, t) for v in views for m, t in zip(v["maps"], v["texts"])]
    regions = region_embeddings(model, [(v, m) for v, m, _ in jobs], batch_size, device) if jobs else None
    region_texts = [t for _, _, t in jobs]
    with_global = [v for v in views if v["global_text"]]
    for start in range(0, len(with_global), batch_size):
        chunk = with_global[start:start + batch_size]
        low = torch.from_numpy(np.stack([v["low"] for v in chunk])).to(device)
        feats, _ = model.encode_low(low)
        globals_.append(torch.nn.functional.normalize(model.image_proj(feats.mean(1)), dim=-1).float().cpu())
        global_texts += [v["global_text"] for v in chunk]
    metrics = {"eval_images": len(views), "eval_regions": len(region_texts), "eval_global": len(global_texts)}
    if region_texts:
        names = list(dict.fromkeys(region_texts))
        metrics |= recall(regions, region_texts, encode_texts(names), names, "region", "caption")
        metrics["distinct_region_captions"] = len(names)
    if global_texts:
        names = list(dict.fromkeys(global_texts))
        metrics |= recall(torch.cat(globals_), global_texts, encode_texts(names), names, "image", "global_caption")
    return metrics
