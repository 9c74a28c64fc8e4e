"""Build caption requests: for each box, the whole image and the crop with the local prompt; for
the image, the whole image with the global prompt.

Each image is decoded once for all its requests, at the smallest libjpeg scale (1, 1/2, 1/4, 1/8)
that still gives every crop and the whole view the pixels their budget allows: a 4K image with
small boxes needs its full-scale pixels for the crops, one with only large boxes (tiles) does not,
and a global-only request needs just a 1/8-scale draft. Views are resized to at most `max_pixels`
(default 256·28·28, about what a Qwen2-VL-class model turns into 256 visual tokens).

JPEGs are decoded by simplejpeg (libjpeg-turbo, bundled in its wheel) straight into a 4-byte RGBX
buffer that PIL maps without a copy, with merged chroma upsampling (libjpeg's fast integer DCT is
faster still but doubles the error against the source pixels, so the accurate one is kept):
34 ms of CPU for a 4K JPEG at full scale against PIL's 44 (PIL unpacks scanline by scanline into its
own buffer; benchmarks/caption.py). Scaled decodes cost the same either way, as Huffman decoding
dominates them. Anything else goes through PIL: CMYK and YCCK JPEGs (so their colours stay PIL's
reading of them), other formats and damaged files (so callers see the errors they already handle).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import simplejpeg
from PIL import Image

from schemas.tables import GLOBAL_REGION

Image.MAX_IMAGE_PIXELS = None  # ingest already enforced ingest.max_pixels


@dataclass
class CaptionRequest:
    uid: str
    region_id: int  # GLOBAL_REGION for the global caption
    box: list[int] | None
    images: list[Image.Image]  # [whole] or [whole, crop]
    prompt: str


@dataclass
class CaptionResult:
    """A back end's answer to one request: text, or error (why it failed); token counts when known."""

    text: str | None = None
    error: str | None = None
    n_tokens: int = 0
    prompt_tokens: int = 0
    extra: dict = field(default_factory=dict)


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(w, h) with the same aspect and at most max_pixels pixels (never enlarged)."""
    if width * height <= max_pixels:
        return width, height
    f = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * f)), max(1, int(height * f))


def decode_scale(width: int, height: int, boxes: list[list[int]], max_pixels: int) -> int:
    """Largest JPEG reduction (1, 2, 4, 8) that leaves every view at least its target pixel count."""
    needed = [min(width * height, max_pixels) / (width * height)]
    needed += [min((b[2] - b[0]) * (b[3] - b[1]), max_pixels) / ((b[2] - b[0]) * (b[3] - b[1])) for b in boxes]
    linear = 1 / math.sqrt(max(needed))  # how far the most demanding view may be shrunk
    return max(s for s in (1, 2, 4, 8) if s <= linear)


SIMPLEJPEG_COLORSPACES = {"Gray", "YCbCr", "RGB"}  # CMYK and YCCK are left to PIL's colour conversion


def decode_jpeg_rgbx(data: bytes, min_width: int, min_height: int) -> Image.Image | None:
    """An RGBX image of a JPEG at the smallest libjpeg scale of at least min_width x min_height,
    or None when it is not such a JPEG or simplejpeg cannot decode it (PIL then does). Other formats
    fail the header read, which costs microseconds."""
    try:
        if simplejpeg.decode_jpeg_header(data)[2] not in SIMPLEJPEG_COLORSPACES:
            return None
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGBX", fastupsample=True,
                                        min_width=min_width, min_height=min_height)
    except ValueError:
        return None
    height, width = pixels.shape[:2]
    return Image.frombuffer("RGBX", (width, height), pixels, "raw", "RGBX", 0, 1)


def decode_for_requests(data: bytes, width: int, height: int, boxes: list[list[int]], max_pixels: int) -> tuple[Image.Image, float]:
    """(decoded image, its scale relative to the original: 1, 1/2, 1/4 or 1/8). Its mode is RGB,
    or RGBX (the same pixels, PIL's own layout) from simplejpeg: views made from it are converted."""
    s = decode_scale(width, height, boxes, max_pixels)
    size = (math.ceil(width / s), math.ceil(height / s))
    img = decode_jpeg_rgbx(data, *size)
    if img is None:
        img = Image.open(io.BytesIO(data))
        if s > 1:
            img.draft("RGB", size)
        img.load()
        if img.mode != "RGB":  # converting an RGB image would only copy it (~10 ms at 4K)
            img = img.convert("RGB")
    return img, img.size[0] / width


def shrink(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Downscale to `size`: an integer box-filter reduction first, then bilinear for the rest
    (about 3x cheaper than one bicubic pass over a 4K image, and as good at these ratios)."""
    if img.size == size:
        return img
    factor = min(img.size[0] // size[0], img.size[1] // size[1])
    if factor >= 2:
        img = img.reduce(factor)
    return img.resize(size, Image.Resampling.BILINEAR)


def rgb_view(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`img` shrunk to `size`, in mode RGB (what every engine takes; an RGBX decode is converted)."""
    view = shrink(img, size)
    return view if view.mode == "RGB" else view.convert("RGB")


def build_requests(uid: str, data: bytes, width: int, height: int, boxes: list[list[int]], local_prompt: str,
                   global_prompt: str | None, max_pixels: int) -> list[CaptionRequest]:
    """One request per box (region_id = its index) and, when global_prompt is set, one global request."""
    img, scale = decode_for_requests(data, width, height, boxes, max_pixels)
    whole = rgb_view(img, fit_size(*img.size, max_pixels))
    out = []
    for region_id, box in enumerate(boxes):
        area = tuple(round(v * scale) for v in box)
        crop = img.crop(area)
        crop = rgb_view(crop, fit_size(*crop.size, max_pixels))
        out.append(CaptionRequest(uid, region_id, list(box), [whole, crop], local_prompt))
    if global_prompt:
        out.append(CaptionRequest(uid, GLOBAL_REGION, None, [whole], global_prompt))
    return out
