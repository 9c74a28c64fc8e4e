"""PS3's box algorithm (segment, score candidate boxes, keep the top k without overlap), with segments
weighed by how much they stand out rather than only by how small they are (docs/design.md, "Regions").

Tuned on real pictures (benchmarks/regions_real.py), where PS3's small-mask score puts boxes on
clouds, moss and bokeh: texture makes many small masks. Here a segment's weight is the product of
- colour ownership: its share of all the pixels of its colour (area / area of that colour in the
  whole image, from a smoothed Lab histogram). A distinct object owns its colours; a texture or a
  repeated element shares them with every other copy, so each copy weighs little;
- local contrast: the distance in Lab between the segment and a ring around it;
- compactness: bounding-box fill, and a minimum thickness;
- edge coherence: where the lightness edges around a segment all run one way (the blend pieces
  along the edge between two flat regions) it weighs little;
- a size prior (PS3's): segments above `small_area` of the image weigh less in proportion, and
  segments above `max_segment_fraction` (background, flat regions) nothing.
Segments come from two felzenszwalb levels: a coarse one whose segments are objects and a fine one
whose segments are the small details of generated scenes and icons; on the fine level a segment in a
patch much busier than the picture on average counts as distinct too (detail_lift).

Candidates are centred on the heaviest segments, at the smallest of a few box scales that frames the
segment with a margin (and the next one up), so an object is framed rather than cut. A box's score
is the weight of the segments mostly inside it, slightly discounted for size (the tighter box wins).
Selection is greedy and spreads the boxes: a kept box consumes its segments' weight, so the next box
must find weight elsewhere (no pile-up on one structure); boxes do not overlap; below `min_score`,
fewer than k boxes are kept rather than filler.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.regions.boxes import summed_area
from schemas.config import DistinctOptions

LAB_LOW = np.array([0.0, -100.0, -100.0])
LAB_HIGH = np.array([100.0, 100.0, 100.0])


def rgb_to_lab(pixels: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(pixels)


def colour_bins(lab: np.ndarray, bins: int) -> np.ndarray:
    """Integer Lab histogram coordinates (..., 3) of Lab values."""
    return np.clip(((lab - LAB_LOW) / (LAB_HIGH - LAB_LOW) * bins).astype(np.int64), 0, bins - 1)


def colour_share(lab: np.ndarray, bins: int, smooth: float) -> np.ndarray:
    """Smoothed Lab histogram of the picture as fractions of its pixels (bins^3)."""
    q = colour_bins(lab, bins).reshape(-1, 3)
    hist = np.bincount(np.ravel_multi_index(q.T, (bins,) * 3), minlength=bins**3).reshape((bins,) * 3)
    return ndimage.gaussian_filter(hist / len(q), smooth, mode="constant")


def segment_table(labels: np.ndarray, lab: np.ndarray, lab_sat: np.ndarray) -> dict[str, np.ndarray]:
    """Per segment: pixel count, mean Lab, bounding box [x1, y1, x2, y2] and local contrast (Lab
    distance of its mean to the mean of a ring: its box grown by half its long side)."""
    h, w = labels.shape
    flat = labels.ravel()
    count = np.bincount(flat).astype(np.float64)
    mean = np.stack([np.bincount(flat, lab[..., c].ravel(), minlength=len(count)) for c in range(3)], 1) / count[:, None]
    slices = ndimage.find_objects(labels + 1)
    box = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], np.float64)
    grow = np.maximum(2.0, 0.5 * np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]))
    x1 = np.clip(box[:, 0] - grow, 0, w).astype(np.int64)
    x2 = np.clip(box[:, 2] + grow, 0, w).astype(np.int64)
    y1 = np.clip(box[:, 1] - grow, 0, h).astype(np.int64)
    y2 = np.clip(box[:, 3] + grow, 0, h).astype(np.int64)
    around = lab_sat[y2, x2] - lab_sat[y1, x2] - lab_sat[y2, x1] + lab_sat[y1, x1]  # (L, a, b, count) sums
    ring = (around[:, :3] - mean * count[:, None]) / np.maximum(around[:, 3] - count, 1.0)[:, None]
    return {"count": count, "mean": mean, "box": box, "contrast": np.linalg.norm(mean - ring, axis=1)}


def edge_coherence(lab: np.ndarray, sigma: float) -> np.ndarray:
    """Per pixel, how one-directional the lightness structure around it is (structure-tensor
    coherence, 0 to 1): 1 along a straight or smooth edge, low where edges run every way (text,
    a checker, fur, an object's outline seen whole)."""
    light = lab[..., 0]
    gx, gy = ndimage.sobel(light, axis=1), ndimage.sobel(light, axis=0)
    jxx, jyy, jxy = (ndimage.gaussian_filter(v, sigma) for v in (gx * gx, gy * gy, gx * gy))
    return np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / np.maximum(jxx + jyy, 1e-6)


def detail_lift(labels: np.ndarray, count: np.ndarray, window: int, floor: float) -> np.ndarray:
    """Per segment: how much denser segments are around it than in the picture on average (or than
    `floor` segments per pixel, so the few blend segments of a flat picture are no detail), minus 1:
    0 where the picture is as busy as everywhere else (texture), large where a small busy patch sits
    in a calm picture (a detailed object)."""
    density = (1.0 / count)[labels]  # each segment adds up to 1
    local = ndimage.uniform_filter(density, size=max(3, window), mode="nearest")
    mean = max(len(count) / labels.size, floor)
    per_segment = np.bincount(labels.ravel(), local.ravel(), minlength=len(count)) / count
    return np.maximum(per_segment / mean - 1.0, 0.0)


def segment_weights(seg: dict[str, np.ndarray], share: np.ndarray, n_pixels: int, opts: DistinctOptions,
                    small_area: float, lift: np.ndarray | None = None) -> np.ndarray:
    """How much each segment stands out (module docstring): (colour ownership or, with `lift`, a busy
    patch) x contrast x compactness x size."""
    count, box = seg["count"], seg["box"]
    fraction = count / n_pixels
    q = colour_bins(seg["mean"], opts.colour_bins)
    colour_fraction = np.maximum(share[q[:, 0], q[:, 1], q[:, 2]], 1e-9)
    ownership = np.minimum(fraction / colour_fraction, 1.0)
    if lift is not None:
        ownership = np.maximum(ownership, np.clip(lift / opts.detail_lift_ref, 0.0, 1.0))
    contrast = np.clip(seg["contrast"] / opts.contrast_ref, 0.0, 1.0)
    bw, bh = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    fill = count / np.maximum(bw * bh, 1.0)
    thickness = np.clip(count / np.maximum(np.maximum(bw, bh), 1.0) / opts.min_thickness, 0.0, 1.0)
    size = np.minimum(1.0, small_area / fraction)
    weight = ownership * contrast * fill * thickness * size
    weight[(fraction > opts.max_segment_fraction) | (count < 3)] = 0.0
    return weight


def candidate_boxes(box: np.ndarray, weight: np.ndarray, width: int, height: int, opts: DistinctOptions) -> np.ndarray:
    """Square boxes centred on the heaviest segments, at the `scales_per_segment` smallest scales that
    frame the segment with `margin` (none when no scale does: background); all inside the picture."""
    sides = np.asarray(opts.box_scales, np.float64) * min(width, height)
    order = np.argsort(-weight, kind="stable")[:opts.candidates]
    order = order[weight[order] > 0]
    out = []
    for s in order:
        cx, cy = (box[s, 0] + box[s, 2]) / 2, (box[s, 1] + box[s, 3]) / 2
        need = max(box[s, 2] - box[s, 0], box[s, 3] - box[s, 1]) * opts.margin
        fits = sides[sides >= need]
        for side in fits[:opts.scales_per_segment]:  # a segment no scale frames (background) gets no candidate
            x1 = float(np.clip(cx - side / 2, 0, width - side))
            y1 = float(np.clip(cy - side / 2, 0, height - side))
            out.append([x1, y1, x1 + side, y1 + side])
    return np.asarray(out, np.float64).reshape(-1, 4)


def coverage(candidates: np.ndarray, box: np.ndarray) -> np.ndarray:
    """candidates x segments: 1 where at least half of the segment's bounding box lies in the candidate."""
    ix = np.clip(np.minimum(candidates[:, None, 2], box[None, :, 2]) - np.maximum(candidates[:, None, 0], box[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(candidates[:, None, 3], box[None, :, 3]) - np.maximum(candidates[:, None, 1], box[None, :, 1]), 0, None)
    inside = ix * iy / np.maximum((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]), 1.0)[None, :]
    return (inside > 0.5).astype(np.float64)


def select_spread(candidates: np.ndarray, cover: np.ndarray, weight: np.ndarray, k: int, min_score: float,
                  preference: np.ndarray) -> tuple[list[int], list[float]]:
    """Greedy: the candidate holding the most weight not yet taken (times its `preference`), no overlap
    with kept boxes, until k boxes or the best remaining holds less than min_score."""
    remaining, kept, scores = weight.copy(), [], []
    blocked = np.zeros(len(candidates), bool)
    for _ in range(k):
        score = np.where(blocked, -1.0, (cover @ remaining) * preference)
        best = int(np.argmax(score)) if len(score) else -1
        if best < 0 or score[best] < min_score:
            break
        kept.append(best)
        scores.append(float(score[best]))
        remaining = remaining * (1.0 - cover[best])
        c = candidates[best]
        blocked |= ((np.minimum(candidates[:, 2], c[2]) > np.maximum(candidates[:, 0], c[0]))
                    & (np.minimum(candidates[:, 3], c[3]) > np.maximum(candidates[:, 1], c[1])))
    return kept, scores


def analyse(pixels: np.ndarray, opts: DistinctOptions, sigma: float) -> dict:
    """Everything the box scores are made of, for an RGB copy of the picture: Lab pixels, segments
    of every level (box, weight, contrast, edge coherence), candidate boxes and which segments each
    candidate covers."""
    from skimage.segmentation import felzenszwalb

    lab = rgb_to_lab(pixels)
    h, w = lab.shape[:2]
    share = colour_share(lab, opts.colour_bins, opts.colour_smoothing)
    lab_sat = summed_area_stack(np.concatenate([lab, np.ones((h, w, 1))], axis=2))
    one_way = edge_coherence(lab, opts.coherence_sigma) if opts.coherence_power > 0 else None
    boxes, weights, contrasts, coherences, segments = [], [], [], [], 0
    for level in opts.levels:
        labels = felzenszwalb(pixels, scale=level.scale, sigma=sigma, min_size=level.min_size)
        seg = segment_table(labels, lab, lab_sat)
        segments += len(seg["count"])
        lift = detail_lift(labels, seg["count"], round(opts.detail_window * min(h, w)), opts.detail_floor) if level.detail else None
        weight = segment_weights(seg, share, h * w, opts, level.small_area, lift) * level.weight
        coherence = np.zeros(len(weight))
        if one_way is not None:  # the blend pieces along the edge between two flat regions
            coherence = np.bincount(labels.ravel(), one_way.ravel(), minlength=len(weight)) / seg["count"]
            weight = weight * (1.0 - coherence) ** opts.coherence_power
        boxes.append(seg["box"])
        weights.append(weight)
        contrasts.append(seg["contrast"] / opts.contrast_ref)
        coherences.append(coherence)
    box, weight = np.concatenate(boxes), np.concatenate(weights)
    candidates = candidate_boxes(box, weight, w, h, opts)
    return {"lab": lab, "box": box, "weight": weight, "contrast": np.concatenate(contrasts), "coherence": np.concatenate(coherences),
            "segments": segments, "candidates": candidates, "cover": coverage(candidates, box)}


def distinct_boxes(pixels: np.ndarray, opts: DistinctOptions, k: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(boxes in the copy's pixels as floats, scores) for an RGB copy of the picture."""
    a = analyse(pixels, opts, sigma)
    candidates = a["candidates"]
    if len(candidates) == 0:
        return np.zeros((0, 4)), np.zeros(0)
    side = candidates[:, 2] - candidates[:, 0]
    preference = (side.min() / side) ** opts.size_penalty  # a larger box wins only by holding clearly more: tight boxes
    kept, scores = select_spread(candidates, a["cover"], a["weight"], k, opts.min_score, preference)
    return candidates[kept], np.asarray(scores, np.float64)


def summed_area_stack(maps: np.ndarray) -> np.ndarray:
    """Summed-area table of each channel of an (h, w, c) array, zero-padded: (h + 1, w + 1, c)."""
    return np.stack([summed_area(maps[..., c]) for c in range(maps.shape[2])], axis=2)
