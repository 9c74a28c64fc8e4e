"""Region-level dedup inside one image: a box that mostly repeats a kept box (by overlap) or says the
same thing (by caption) adds nothing to the sample."""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")


def iou(a: list[int], b: list[int]) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def word_jaccard(a: str, b: str) -> float:
    wa, wb = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    return len(wa & wb) / len(wa | wb) if wa | wb else 1.0


def kept_boxes(boxes: list[list[int]], texts: list[str] | None, max_iou: float, max_similarity: float) -> list[int]:
    """Indices of the boxes to keep, in order: each is kept unless it overlaps an already kept box by
    more than max_iou, or (with captions) its caption's word-set Jaccard with a kept box's caption is
    at least max_similarity. Empty texts (no captioner) are never compared."""
    kept: list[int] = []
    for i, box in enumerate(boxes):
        if any(iou(box, boxes[k]) > max_iou for k in kept):
            continue
        if texts and texts[i] and any(texts[k] and word_jaccard(texts[i], texts[k]) >= max_similarity for k in kept):
            continue
        kept.append(i)
    return kept
