"""Text-line boxes for document pages, with RapidOCR's text detector (PP-OCR, ONNX).

The detector's weights ship inside the `rapidocr` wheel, so nothing is downloaded at run time. It is
an optional extra (`pip install 'localcap[ocr]'`): it brings onnxruntime and OpenCV (headless).
Only detection runs: the captioner, not OCR, writes the text.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from pipeline.regions import ProposerUnavailable
from pipeline.regions.boxes import check_boxes


class OcrUnavailable(ProposerUnavailable):
    pass


@lru_cache(maxsize=4)
def _detector(max_side: int):
    try:
        from rapidocr import RapidOCR
    except ImportError as exc:
        raise OcrUnavailable("regions.method 'ocr' needs the OCR extra: pip install 'localcap[ocr]' "
                             f"(rapidocr and onnxruntime; import failed: {exc})") from None
    return RapidOCR(params={
        "Global.use_cls": False,
        "Global.use_rec": False,
        "Global.log_level": "error",
        "Global.max_side_len": max_side,
        "EngineConfig.onnxruntime.intra_op_num_threads": 1,
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
    })


def check_available() -> None:
    """Fail before any work starts when the OCR extra is missing."""
    _detector(960)


def text_line_boxes(data: bytes, width: int, height: int, max_side: int, min_height: int) -> np.ndarray:
    """Axis-aligned boxes of the detected text lines, top to bottom, in original pixels. The page is
    decoded at reduced scale (JPEG draft) near the detector's input size."""
    img = Image.open(io.BytesIO(data))
    factor = min(1.0, max_side / max(width, height))
    img.draft("RGB", (max(1, round(width * factor)), max(1, round(height * factor))))
    img = img.convert("RGB")
    sx, sy = width / img.size[0], height / img.size[1]
    result = _detector(max_side)(img)
    if getattr(result, "boxes", None) is None or len(result.boxes) == 0:
        return np.zeros((0, 4), np.int64)
    quads = np.asarray(result.boxes, dtype=np.float64)  # n x 4 corners x (x, y)
    boxes = np.concatenate([quads.min(axis=1), quads.max(axis=1)], axis=1) * [sx, sy, sx, sy]
    boxes = np.rint(boxes).astype(np.int64)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] - boxes[:, 1] >= min_height)
    boxes = boxes[keep]
    boxes = boxes[np.lexsort((boxes[:, 0], boxes[:, 1]))]
    check_boxes(boxes, width, height)
    return boxes
