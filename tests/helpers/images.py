"""Test inputs made on the fly: good scenes and every kind of bad file ingest must reject or fix."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.synthetic import encode, generate_scene


def scene_jpeg(seed: int, width: int = 1600, height: int = 1200, **kw) -> bytes:
    img, _ = generate_scene(seed, width, height, n_objects=2)
    return encode(img, "JPEG", quality=85, **kw)


def exif_rotated_jpeg(seed: int = 7, width: int = 1600, height: int = 1200, orientation: int = 6) -> bytes:
    """Stored landscape (width x height) with an EXIF tag saying: rotate to portrait for display."""
    img, _ = generate_scene(seed, width, height, n_objects=1)
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "localcap-test-camera"
    return encode(img, "JPEG", quality=85, exif=exif.tobytes())


def cmyk_jpeg(seed: int = 8) -> bytes:
    img, _ = generate_scene(seed, 1300, 1100, n_objects=1)
    out = io.BytesIO()
    img.convert("CMYK").save(out, "JPEG", quality=85)
    return out.getvalue()


def png16(seed: int = 9, width: int = 1200, height: int = 1100) -> bytes:
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 65535, width, dtype=np.float64)[None, :] * np.ones((height, 1))
    arr = np.clip(grad + rng.normal(0, 500, (height, width)), 0, 65535).astype(np.uint16)
    yy, xx = np.mgrid[0:160, 0:160]
    arr[450:610, 520:680] = np.where((yy // 20 + xx // 20) % 2, 60000, 3000)  # a checker: something to box
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "PNG")  # mode I;16 -> a 16-bit grayscale PNG
    return out.getvalue()


def bomb_png_header(width: int = 40000, height: int = 40000) -> bytes:
    """A valid small PNG whose IHDR claims width x height pixels (1.6 G by default)."""
    small = io.BytesIO()
    Image.new("L", (1, 1)).save(small, "PNG")
    data = bytearray(small.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    import zlib

    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def write_bad_inputs(folder: Path) -> dict[str, str | None]:
    """Write the acceptance folder of bad inputs; returns file name -> expected reject reason (None = accepted)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = scene_jpeg(1)
    files = {
        "good.jpg": (good, None),
        "truncated.jpg": (scene_jpeg(2)[: len(good) // 2], "truncated"),
        "empty.jpg": (b"", "empty_file"),
        "text.jpg": (b"this is a text file, not a JPEG\n" * 4, "not_an_image"),
        "small.jpg": (scene_jpeg(3, 800, 600), "too_small"),
        "bomb.png": (bomb_png_header(), "too_many_pixels"),
        "cmyk.jpg": (cmyk_jpeg(), None),
        "deep.png": (png16(), None),
        "rotated.jpg": (exif_rotated_jpeg(), None),
        "anim.gif": (encode(generate_scene(4, 1100, 1100, 1)[0].convert("P"), "GIF"), "unsupported_format"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}
