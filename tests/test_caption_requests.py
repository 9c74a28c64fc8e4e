"""Caption requests: one decode per image at the smallest sufficient scale, views within budget,
crops that show the box, and the one message format every back end uses."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from captioners.messages import chat_messages, pil_part, url_part
from captioners.requests import build_requests, decode_scale, fit_size
from pipeline.synthetic import encode, generate_scene
from schemas.tables import GLOBAL_REGION

BUDGET = 256 * 28 * 28


def test_decode_scale_is_the_smallest_that_keeps_every_view_in_budget():
    assert decode_scale(3840, 2160, [[0, 0, 432, 432]], BUDGET) == 1  # a small box needs full-scale pixels
    assert decode_scale(3840, 2160, [[0, 0, 2048, 2048]], BUDGET) == 4  # a big tile does not
    assert decode_scale(3840, 2160, [], BUDGET) == 4  # the whole view alone: 8.3 MP -> 0.2 MP
    assert decode_scale(640, 480, [], BUDGET) == 1


def test_fit_size_keeps_aspect_and_budget():
    w, h = fit_size(3840, 2160, BUDGET)
    assert w * h <= BUDGET and abs(w / h - 3840 / 2160) < 0.01
    assert fit_size(300, 200, BUDGET) == (300, 200)


def test_requests_for_boxes_and_global():
    img, objects = generate_scene(4, 3840, 2160, n_objects=2)
    data = encode(img, "JPEG", quality=95)
    boxes = [list(o.box) for o in objects] + [[0, 0, 2048, 2048]]
    reqs = build_requests("u1", data, 3840, 2160, boxes, "LOCAL", "GLOBAL", BUDGET)
    assert [r.region_id for r in reqs] == [0, 1, 2, GLOBAL_REGION]
    assert [r.box for r in reqs] == boxes + [None]
    whole = reqs[-1].images[0]
    assert len(reqs[-1].images) == 1 and reqs[-1].prompt == "GLOBAL"
    assert whole.size[0] * whole.size[1] <= BUDGET
    source = np.asarray(img.convert("RGB"), dtype=np.int16)
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    for r in reqs[:-1]:
        assert r.prompt == "LOCAL" and r.images[0] is whole  # the whole view is made once per image
        crop = r.images[1]
        x1, y1, x2, y2 = r.box
        assert crop.size[0] * crop.size[1] <= BUDGET
        if (x2 - x1) * (y2 - y1) <= BUDGET:  # small boxes: full-scale pixels, exactly the box
            assert crop.size == (x2 - x1, y2 - y1) and crop.mode == "RGB"
            # simplejpeg's merged chroma upsampling differs from PIL's fancy one at colour edges, by
            # up to ~13 levels on these objects, but is no farther from the pixels that were encoded
            error = np.abs(np.asarray(crop, np.int16) - source[y1:y2, x1:x2]).mean()
            pil_error = np.abs(pil[y1:y2, x1:x2] - source[y1:y2, x1:x2]).mean()
            shifted = np.abs(np.asarray(crop, np.int16) - source[y1 + 6:y2 + 6, x1 + 6:x2 + 6]).mean()
            assert error <= pil_error + 0.5 and shifted > error + 10


def test_one_message_format_for_every_back_end():
    img, _ = generate_scene(5, 1600, 1200, n_objects=1)
    (req, glob) = build_requests("u", encode(img), 1600, 1200, [[10, 10, 400, 300]], "describe the crop", "describe it", BUDGET)
    msgs = chat_messages(req, url_part("png"))
    assert msgs[0]["role"] == "user" and [p["type"] for p in msgs[0]["content"]] == ["image_url", "image_url", "text"]
    url = msgs[0]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert np.array_equal(np.asarray(decoded), np.asarray(req.images[1]))  # png travels losslessly
    assert [p["type"] for p in chat_messages(glob, pil_part)[0]["content"]] == ["image_pil", "text"]


def _jpeg(img: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", **options)
    return out.getvalue()


def test_every_kind_of_input_gives_the_same_rgb_views_as_pil():
    """simplejpeg takes baseline and progressive RGB and grey JPEGs; CMYK JPEGs, PNGs and WebPs go
    through PIL. Either way the views are RGB and show the same pixels."""
    scene, _ = generate_scene(6, 1600, 1200, n_objects=2)
    box = [200, 150, 600, 450]
    inputs = {
        "jpeg": _jpeg(scene, quality=92),
        "progressive": _jpeg(scene, quality=92, progressive=True),
        "grey": _jpeg(scene.convert("L"), quality=92),
        "cmyk": _jpeg(scene.convert("CMYK"), quality=92),
        "png": encode(scene, "PNG"),
        "webp": encode(scene, "WEBP"),
    }
    for name, data in inputs.items():
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
        req, glob = build_requests("u", data, 1600, 1200, [box], "l", "g", BUDGET)
        whole, crop = req.images
        assert whole.mode == crop.mode == "RGB", name
        assert crop.size == (400, 300), name
        assert np.abs(np.asarray(crop, np.int16) - reference[150:450, 200:600]).mean() < 2.5, name
        expected = np.asarray(Image.fromarray(reference.astype(np.uint8)).resize(whole.size, Image.Resampling.BOX), np.int16)
        assert np.abs(np.asarray(whole, np.int16) - expected).mean() < 3.0, name


def test_a_damaged_jpeg_fails_as_pil_fails():
    """A JPEG cut short is refused by simplejpeg; PIL then decides, so the caption stage records the
    same error as before (ingest rejects such files; this is bytes damaged after ingest)."""
    scene, _ = generate_scene(7, 1600, 1200, n_objects=1)
    data = _jpeg(scene, quality=92)
    with pytest.raises(OSError, match="truncated"):
        build_requests("u", data[: len(data) // 2], 1600, 1200, [[0, 0, 100, 100]], "l", None, BUDGET)
