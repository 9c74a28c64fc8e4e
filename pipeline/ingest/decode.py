"""Decode-validate one input: accept it as an images-table row, or reject it with a reason.

Pure function of (bytes, source URI, limits). Decoding is as cheap as validation allows: the header
gives format and size before any pixels are read; JPEGs are decoded through libjpeg's DCT scaling
(`Image.draft`), which still walks the whole entropy-coded stream (so truncation is caught) but
produces only the smallest 1/2^n-scale image that covers the thumbnail. This is the one decode of
the image in the whole pipeline: the thumbnail (`ingest.thumb_side`, stored as a small JPEG in the
`thumb` column) is what the perceptual hashes and the region proposer look at. An exact copy of an
input already decoded in this process is answered from memory (ExactCopies).

Stored bytes: trainers decode shards with plain PIL `.convert("RGB")` and ignore EXIF, so the bytes
pass through untouched only when that already yields the oriented 8-bit RGB image the boxes refer
to. Otherwise (EXIF rotation, CMYK, 16-bit, alpha, TIFF/BMP, ...) a normalised encoding is stored
(JPEG for lossy sources, PNG for lossless ones) and `meta.normalized` says why.

Blank images: what the trainer would see (alpha flattened exactly as it is stored) is measured on
the thumbnail the perceptual hashes use, so nothing is decoded twice; a near-uniform one is a
`blank` reject (see BLANK_MAX_STD). Alpha is flattened over white, as a viewer shows it, unless
that leaves nothing to see while black does not (a white picture drawn only in its alpha channel,
e.g. some wallpapers and logos): then over black, and `meta.alpha_background` says so.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError

from dedupe.hashing import content_hashes, hash_input, sha256_hex, shrink, uid_from_sha256
from schemas.config import IngestSection
from schemas.tables import RejectReason

# We enforce ingest.max_pixels ourselves from the header, before decoding; PIL's own guard would
# turn large-but-allowed images into errors.
Image.MAX_IMAGE_PIXELS = None

PASSTHROUGH_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}
PASSTHROUGH_MODES = {"RGB", "L", "P", "1"}
LOSSY_FORMATS = {"JPEG", "MPO", "WEBP"}
EXIF_ORIENTATION = 0x0112
EXIF_KEEP = {0x010F: "make", 0x0110: "model", 0x0132: "datetime", 0x0131: "software"}
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
WHITE, BLACK = (255, 255, 255), (0, 0, 0)

THUMB_QUALITY = 90  # the stored thumbnail's JPEG quality: segmentation and hashing see no difference from lossless

BLANK_MAX_STD = 2.0
"""An image is `blank` when every RGB channel of its hash thumbnail (dedupe.hashing.hash_input: <= 256 px
on the long side, alpha flattened as stored) has a standard deviation below this, in 0-255 levels
(under 1 % contrast). Measured: a solid fill, PNG or JPEG, gives 0.0; per-pixel noise of sigma 3
(PNG) or 10 (JPEG) on a flat grey, averaged by the downscale, 0.5 and 1.8: blank. A 10-level
gradient across the image gives 2.9, a 200 -> 160 one 11.5, a 40 px dark square on a 1600x1200
plain ground 5.9, and a patch covering 1 % of the image 100 levels off gives
about 10: kept. Per channel, not on grey, so that two colours of equal luminance still count."""


@dataclass(frozen=True)
class Rejection:
    reason: RejectReason
    detail: str
    uid: str | None = None


def _exif_subset(exif: Image.Exif) -> dict:
    out = {}
    for tag, name in EXIF_KEEP.items():
        value = exif.get(tag)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value not in (None, ""):
            out[name] = str(value).strip("\x00 ").strip()
    return out


def _png_bit_depth(data: bytes) -> int:
    # IHDR is always the first chunk: 8-byte signature, length, "IHDR", width, height, bit depth.
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else 8


def _why_normalise(fmt: str, mode: str, info: dict, orientation: int, data: bytes) -> str | None:
    if fmt not in PASSTHROUGH_FORMATS:
        return f"format {fmt}"
    if orientation != 1:
        return f"exif orientation {orientation}"
    if mode not in PASSTHROUGH_MODES:
        return f"mode {mode}"
    if "transparency" in info:
        return f"mode {mode} with transparency"
    if fmt == "PNG" and _png_bit_depth(data) > 8:
        return f"{_png_bit_depth(data)}-bit PNG"
    return None


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or "transparency" in image.info


def to_rgb8(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The 8-bit RGB picture a viewer would show: alpha over `background` (white unless decode
    chose black, see the module docstring), 16-bit scaled, CMYK converted."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.int64)
        scale = 256 if arr.max(initial=0) > 255 else 1
        return Image.fromarray(np.clip(arr // scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max(initial=0)
        arr = arr / top * 255 if top > 255 else arr
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(under, rgba).convert("RGB")
    return image.convert("RGB")


def _normalised_bytes(data: bytes, source_format: str, quality: int,
                      background: tuple[int, int, int] = WHITE) -> tuple[bytes, str]:
    with Image.open(io.BytesIO(data)) as full:
        full.load()
        oriented = ImageOps.exif_transpose(full)
        rgb = to_rgb8(oriented, background)
    out = io.BytesIO()
    if source_format in LOSSY_FORMATS:
        rgb.save(out, "JPEG", quality=quality, optimize=True)
        return out.getvalue(), "JPEG"
    rgb.save(out, "PNG", compress_level=6)
    return out.getvalue(), "PNG"


def spread(rgb: Image.Image) -> float:
    """The largest per-channel standard deviation of an RGB image, in 0-255 levels."""
    return max(ImageStat.Stat(rgb).stddev)


def _flattened_views(decoded: Image.Image, thumb_side: int) -> tuple[Image.Image, Image.Image, float, tuple[int, int, int]]:
    """(thumbnail as stored, hash thumbnail, its spread, the alpha background chosen)."""
    view = shrink(to_rgb8(decoded), thumb_side)
    small = hash_input(view)
    level = spread(small)
    if level < BLANK_MAX_STD and has_alpha(decoded):
        dark_view = shrink(to_rgb8(decoded, BLACK), thumb_side)
        dark = hash_input(dark_view)
        dark_level = spread(dark)
        if dark_level >= BLANK_MAX_STD:
            return dark_view, dark, dark_level, BLACK
    return view, small, level, WHITE


def encode_thumbnail(view: Image.Image) -> bytes:
    out = io.BytesIO()
    view.save(out, "JPEG", quality=THUMB_QUALITY)
    return out.getvalue()


SIGNATURES = {  # magic bytes -> format: bytes that start like an image but do not open are damaged, not "not an image"
    b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP",
    b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
}


def signature_format(data: bytes) -> str | None:
    """The image format the first bytes announce, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in SIGNATURES.items() if data.startswith(magic)), None)


def _decode_error(exc: BaseException, uid: str) -> Rejection:
    text = f"{type(exc).__name__}: {exc}"
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return Rejection(RejectReason.TRUNCATED, text, uid)
    return Rejection(RejectReason.DECODE_ERROR, text, uid)


class ExactCopies:
    """Outcomes of the inputs this process has decoded, by SHA-256 and limits: an exact copy of an
    input already seen (the same wallpaper under three names) is answered without a decode. Bounded
    (least recently used out); a passed-through row keeps no image bytes, its copy's bytes are the same."""

    def __init__(self, capacity: int = 4096):
        self.capacity, self.hits = capacity, 0
        self._seen: OrderedDict[tuple[str, str], dict | Rejection] = OrderedDict()

    def clear(self) -> None:
        self._seen.clear()

    def get(self, key: tuple[str, str], data: bytes, source_uri: str) -> dict | Rejection | None:
        outcome = self._seen.get(key)
        if outcome is None:
            return None
        self._seen.move_to_end(key)
        self.hits += 1
        if isinstance(outcome, Rejection):
            return outcome
        return {**outcome, "source_uri": source_uri, "image": data if outcome["image"] is None else outcome["image"]}

    def put(self, key: tuple[str, str], data: bytes, outcome: dict | Rejection) -> None:
        if isinstance(outcome, dict):
            outcome = {**outcome, "image": None if outcome["image"] is data else outcome["image"]}
        self._seen[key] = outcome
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)


EXACT_COPIES = ExactCopies()


def decode_validate(data: bytes, source_uri: str, limits: IngestSection) -> dict | Rejection:
    """An images-table row (dict) for a good image, else a Rejection naming the reason. The SHA-256
    comes first: an exact copy of an input this process has already decoded is not decoded again."""
    if not data:
        return Rejection(RejectReason.EMPTY_FILE, "0 bytes")
    sha = sha256_hex(data)
    key = (sha, limits.model_dump_json())
    outcome = EXACT_COPIES.get(key, data, source_uri)
    if outcome is None:
        outcome = _decode_validate(data, sha, source_uri, limits)
        EXACT_COPIES.put(key, data, outcome)
    return outcome


def _decode_validate(data: bytes, sha: str, source_uri: str, limits: IngestSection) -> dict | Rejection:
    uid = uid_from_sha256(sha)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        announced = signature_format(data)
        if announced:  # e.g. a PNG whose header chunk fails its CRC
            return Rejection(RejectReason.DECODE_ERROR, f"starts like a {announced} but cannot be opened: damaged header", uid)
        return Rejection(RejectReason.NOT_AN_IMAGE, f"no image format recognises the first bytes {data[:8]!r}", uid)
    except Exception as exc:  # a header that parses as an image format but is broken
        return _decode_error(exc, uid)

    with image:
        fmt = image.format or "unknown"
        if fmt not in limits.formats:
            return Rejection(RejectReason.UNSUPPORTED_FORMAT, f"format {fmt} not in ingest.formats", uid)
        width, height = image.size
        if width * height > limits.max_pixels:
            return Rejection(
                RejectReason.TOO_MANY_PIXELS,
                f"{width}x{height} = {width * height} pixels > ingest.max_pixels = {limits.max_pixels}",
                uid,
            )
        try:
            exif = image.getexif()
        except Exception:
            exif = Image.Exif()
        orientation = exif.get(EXIF_ORIENTATION, 1)
        if orientation not in range(1, 9):
            orientation = 1
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        if min(width, height) < limits.min_side:
            return Rejection(
                RejectReason.TOO_SMALL, f"{width}x{height}: short side below ingest.min_side = {limits.min_side}", uid
            )
        source_mode, info = image.mode, dict(image.info)
        try:
            if fmt in ("JPEG", "MPO"):  # libjpeg's DCT scaling: the smallest of 1/1..1/8 that still covers the thumbnail
                scale = min(1.0, limits.thumb_side / max(image.size))
                image.draft("RGB", (max(1, int(image.size[0] * scale)), max(1, int(image.size[1] * scale))))
            image.load()
            decoded = ImageOps.exif_transpose(image) if orientation != 1 else image
            view, small, level, background = _flattened_views(decoded, limits.thumb_side)
            if level < BLANK_MAX_STD:
                flattened = " (alpha flattened on white and on black)" if has_alpha(decoded) else ""
                return Rejection(RejectReason.BLANK, f"near-uniform: largest channel standard deviation {level:.2f} < "
                                 f"{BLANK_MAX_STD} levels on the {small.size[0]}x{small.size[1]} thumbnail{flattened}", uid)
            hashes = content_hashes(small, crops=limits.crop_hashes)
            thumb = encode_thumbnail(view)
        except Exception as exc:
            return _decode_error(exc, uid)

    meta = {"exif": _exif_subset(exif)} if exif else {}
    reason = _why_normalise(fmt, source_mode, info, orientation, data)
    stored, stored_format = data, PASSTHROUGH_FORMATS.get(fmt, fmt)
    if reason is not None:
        try:
            stored, stored_format = _normalised_bytes(data, fmt, limits.reencode_quality, background)
        except Exception as exc:
            return _decode_error(exc, uid)
        meta.update(normalized=reason, source_format=fmt, source_mode=source_mode, source_n_bytes=len(data))
        if background != WHITE:
            meta["alpha_background"] = "black"
    return {
        "uid": uid,
        "sha256": sha,
        "source_uri": source_uri,
        "width": width,
        "height": height,
        "format": stored_format,
        "n_bytes": len(stored),
        "image": stored,
        **hashes,
        "thumb": thumb,
        "meta": json.dumps(meta, sort_keys=True),
    }
