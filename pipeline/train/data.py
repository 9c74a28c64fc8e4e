"""From a shard sample to a training example: small pure functions, then a torch IterableDataset.

Per image and step one example: with probability `global_caption_prob` the whole image and its global
caption, otherwise one random box and its caption (each image appears once per pass, so two regions
of one image never share a batch). A random resized crop moves the box with the image; the box then
becomes a map over the high-res patch grid. JPEGs are decoded at reduced size (`Image.draft`): the
high-res side is usually far below a 4K original's.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Target:
    """What one example contrasts: a box (None = the whole image) and its caption."""

    box: Box | None
    text: str


def pick_target(boxes: list, captions: list[str], global_caption: str | None, global_prob: float, rng: random.Random) -> Target | None:
    """One box and its caption, or the global caption with probability `global_prob` (or when there
    is no box); None when the sample has nothing to contrast."""
    local = [(tuple(map(float, b)), c) for b, c in zip(boxes, captions) if c]
    use_global = bool(global_caption) and (not local or rng.random() < global_prob)
    if use_global:
        return Target(None, global_caption)
    if not local:
        return None
    box, text = local[rng.randrange(len(local))]
    return Target(box, text)


def random_crop(width: int, height: int, scale: tuple[float, float], rng: random.Random) -> Box:
    """A crop keeping `scale` of the area (uniform in the range) and the image's aspect, placed at random."""
    s = rng.uniform(*scale) ** 0.5
    w, h = width * s, height * s
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return x, y, x + w, y + h


def scale_box(box, sx: float, sy: float) -> Box:
    """`box` (x1, y1, x2, y2) in the pixels of an image resized by (sx, sy)."""
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def move_box(box: Box, crop: Box, out_w: float, out_h: float) -> Box | None:
    """`box` (image pixels) in the coordinates of `crop` resized to out_w x out_h; clipped; None if outside."""
    cx1, cy1, cx2, cy2 = crop
    sx, sy = out_w / (cx2 - cx1), out_h / (cy2 - cy1)
    x1, y1 = max(box[0], cx1), max(box[1], cy1)
    x2, y2 = min(box[2], cx2), min(box[3], cy2)
    if x2 <= x1 or y2 <= y1:
        return None
    return (x1 - cx1) * sx, (y1 - cy1) * sy, (x2 - cx1) * sx, (y2 - cy1) * sy


def box_patch_map(box: Box, side: int, patch: int) -> np.ndarray:
    """Bool grid (side/patch)^2 of the patches whose centres lie in the box; never empty (the patch
    holding the box's centre counts when the box is smaller than a patch)."""
    grid = side // patch
    centres = (np.arange(grid) + 0.5) * patch
    cols = (centres >= box[0]) & (centres <= box[2])
    rows = (centres >= box[1]) & (centres <= box[3])
    out = rows[:, None] & cols[None, :]
    if not out.any():
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        out[min(grid - 1, max(0, int(cy // patch))), min(grid - 1, max(0, int(cx // patch)))] = True
    return out


def decode_reduced(data: bytes, min_side: int) -> tuple[Image.Image, float, float]:
    """RGB image decoded at the smallest JPEG scale whose sides stay >= min_side (others: full decode),
    and the factors (x, y) from original pixels (the boxes' coordinates) to the decoded ones."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    img.draft("RGB", (min_side, min_side))
    img = img.convert("RGB")
    return img, img.width / width, img.height / height


def to_tensor_array(img: Image.Image) -> np.ndarray:
    """CHW float32 in [-1, 1] (SigLIP's normalisation)."""
    return (np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def views(img: Image.Image, low_res: int, high_res: int, crop: Box | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (high-res, low-res) square arrays of an image, or of a crop of it."""
    high = img.resize((high_res, high_res), Image.Resampling.BICUBIC, box=crop)
    return to_tensor_array(high), to_tensor_array(high.resize((low_res, low_res), Image.Resampling.BICUBIC))


def contrastive_example(sample: dict, low_res: int, high_res: int, patch: int, global_prob: float,
                        scale: tuple[float, float], rng: random.Random) -> dict | None:
    """The arrays of one local-contrastive example, or None when the sample has no usable caption."""
    target = pick_target(sample["boxes"], sample["captions"], sample["global_caption"], global_prob, rng)
    if target is None:
        return None
    img, fx, fy = decode_reduced(sample["image"], high_res)
    crop = random_crop(img.width, img.height, scale, rng)
    grid = high_res // patch
    box_map = np.zeros((grid, grid), dtype=bool)
    is_global = target.box is None
    if not is_global:
        moved = move_box(scale_box(target.box, fx, fy), crop, high_res, high_res)
        if moved is None:  # cropped away: fall back to the global view if there is a caption for it
            if not sample["global_caption"]:
                return None
            target, is_global = Target(None, sample["global_caption"]), True
        else:
            box_map = box_patch_map(moved, high_res, patch)
    high, low = views(img, low_res, high_res, crop)
    return {
        "key": sample["key"],
        "high": high,
        "low": low,
        "box_map": box_map,
        "is_global": is_global,
        "text": target.text,
    }


def mae_example(sample: dict, image_size: int, scale: tuple[float, float], rng: random.Random) -> dict:
    img = decode_reduced(sample["image"], image_size)[0]
    crop = random_crop(img.width, img.height, scale, rng)
    return {"key": sample["key"], "pixels": to_tensor_array(img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=crop))}


def eval_view(sample: dict, low_res: int, high_res: int, patch: int) -> dict:
    """A held-out sample as evaluated: the whole image without augmentation, the patch map of every
    captioned box, their captions and the global caption."""
    img, fx, fy = decode_reduced(sample["image"], high_res)
    high, low = views(img, low_res, high_res)
    sx, sy = fx * high_res / img.width, fy * high_res / img.height
    pairs = [(b, c) for b, c in zip(sample["boxes"], sample["captions"]) if c]
    return {
        "high": high,
        "low": low,
        "maps": [box_patch_map(scale_box(b, sx, sy), high_res, patch) for b, _ in pairs],
        "texts": [c for _, c in pairs],
        "global_text": sample["global_caption"] or None,
    }
