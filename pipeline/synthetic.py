"""Synthetic high-resolution scenes with small detailed objects at known places.

Used by the built-in demo, the tests and the benchmarks (no photo corpus ships with the project):
a smooth background (gradient plus low-frequency noise) with a few small, busy objects (checker
patches, noise blobs, clusters of shapes, lines of text) whose boxes are returned.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = "local caption high resolution detail sign label price open exit street market 2048 4K north".split()


@dataclass(frozen=True)
class PlantedObject:
    kind: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2
    colour: str | None = None  # a PALETTE name, for the objects of generate_labelled_scene

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    t = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    grad = c0 * (1 - t) + c1 * t  # 1 x W x 3
    coarse = rng.normal(0, 12, (max(2, height // 256), max(2, width // 256), 3)).astype(np.float32)
    noise = np.asarray(Image.fromarray(coarse[..., 0] + 128).resize((width, height), Image.Resampling.BICUBIC))
    img = np.clip(grad + (noise[..., None] - 128), 0, 255).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(img, (height, width, 3)).copy(), "RGB")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _draw_object(img: Image.Image, rng: np.random.Generator, kind: str, x: int, y: int, side: int) -> tuple[int, int, int, int]:
    draw = ImageDraw.Draw(img)
    if kind == "checker":
        cell = max(3, side // 12)
        for i in range(0, side, cell):
            for j in range(0, side, cell):
                if (i // cell + j // cell) % 2 == 0:
                    draw.rectangle([x + i, y + j, x + i + cell - 1, y + j + cell - 1], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        return x, y, x + side, y + side
    if kind == "noise":
        patch = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        img.paste(Image.fromarray(patch, "RGB"), (x, y))
        return x, y, x + side, y + side
    if kind == "shapes":
        for _ in range(14):
            r = int(rng.integers(side // 16 + 1, side // 6 + 2))
            cx, cy = x + int(rng.integers(r, side - r)), y + int(rng.integers(r, side - r))
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            if rng.random() < 0.5:
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=(0, 0, 0), width=2)
            else:
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=(255, 255, 255), width=2)
        return x, y, x + side, y + side
    # text: a few lines of words on a light card
    font = _font(max(10, side // 7))
    lines = [" ".join(rng.choice(WORDS, 2)) for _ in range(4)]
    draw.rectangle([x, y, x + side, y + side], fill=(245, 245, 235), outline=(20, 20, 20), width=3)
    for k, line in enumerate(lines):
        draw.text((x + side // 12, y + side // 12 + k * (side // 5)), line, fill=(10, 10, 10), font=font)
    return x, y, x + side, y + side


def generate_scene(
    seed: int, width: int = 2048, height: int = 1536, n_objects: int = 3, grain: float = 0.0, object_seed: int | None = None
) -> tuple[Image.Image, list[PlantedObject]]:
    """A scene and its planted objects; objects do not overlap and stay clear of the border.

    `grain` adds per-pixel noise of that standard deviation, so that JPEGs weigh what photos of the
    same size do (a smooth 4K scene is ~0.3 MB as JPEG, a grainy one several MB). `object_seed`, when
    given, draws the objects from their own seed: the same background with different objects.
    """
    rng = np.random.default_rng(seed)
    img = _background(rng, width, height)
    if grain > 0:
        noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, grain, (height, width, 1)).astype(np.int16)
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    if object_seed is not None:
        rng = np.random.default_rng(object_seed)
    short = min(width, height)
    objects: list[PlantedObject] = []
    kinds = ["checker", "noise", "shapes", "text"]
    attempts = 0
    while len(objects) < n_objects and attempts < 200:
        attempts += 1
        side = int(rng.integers(short // 14, short // 8))
        x = int(rng.integers(short // 20, width - side - short // 20))
        y = int(rng.integers(short // 20, height - side - short // 20))
        gap = side // 2
        if any(not (x + side + gap < o.box[0] or o.box[2] + gap < x or y + side + gap < o.box[1] or o.box[3] + gap < y) for o in objects):
            continue
        kind = kinds[int(rng.integers(0, len(kinds)))]
        objects.append(PlantedObject(kind, _draw_object(img, rng, kind, x, y, side)))
    return img, objects


KINDS = ("checker", "noise", "shapes", "text")
PALETTE = {"red": (215, 30, 30), "green": (30, 160, 50), "blue": (25, 70, 230), "yellow": (240, 215, 25),
           "purple": (140, 30, 160), "orange": (245, 135, 15)}


def _draw_coloured(img: Image.Image, rng: np.random.Generator, kind: str, colour: str, x: int, y: int, side: int) -> tuple[int, int, int, int]:
    """An object of one named colour: a colour/white checker, colour-tinted noise, a cluster of
    shapes in the colour, or a card tinted with the colour with text in it."""
    draw, c = ImageDraw.Draw(img), PALETTE[colour]
    if kind == "checker":
        cell = max(3, side // 8)
        for i in range(0, side, cell):
            for j in range(0, side, cell):
                draw.rectangle([x + i, y + j, x + i + cell - 1, y + j + cell - 1], fill=c if (i // cell + j // cell) % 2 == 0 else (250, 250, 250))
    elif kind == "noise":
        patch = np.clip(np.asarray(c, np.float32)[None, None] + rng.normal(0, 60, (side, side, 3)), 0, 255).astype(np.uint8)
        img.paste(Image.fromarray(patch, "RGB"), (x, y))
    elif kind == "shapes":
        for _ in range(10):
            r = int(rng.integers(side // 12 + 1, side // 6 + 2))
            cx, cy = x + int(rng.integers(r, side - r)), y + int(rng.integers(r, side - r))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([cx - r, cy - r, cx + r, cy + r], fill=c, outline=(0, 0, 0), width=2)
    else:
        font = _font(max(10, side // 7))
        tint = tuple(int(0.35 * v + 0.65 * 250) for v in c)  # a card tinted with the colour, text in the colour
        draw.rectangle([x, y, x + side, y + side], fill=tint, outline=(20, 20, 20), width=3)
        for k in range(4):
            draw.text((x + side // 12, y + side // 12 + k * (side // 5)), " ".join(rng.choice(WORDS, 2)), fill=c, font=font)
    return x, y, x + side, y + side


def generate_labelled_scene(seed: int, width: int = 1024, height: int = 768, n_objects: int = 3,
                            min_frac: float = 1 / 8, max_frac: float = 1 / 4) -> tuple[Image.Image, list[PlantedObject]]:
    """A scene whose objects each have a kind (KINDS) and one named colour (PALETTE): what the tiny
    captioner is trained on (captioners/train_tiny.py). Sides are min_frac..max_frac of the short side."""
    rng = np.random.default_rng(seed)
    img = _background(rng, width, height)
    short, objects, attempts = min(width, height), [], 0
    while len(objects) < n_objects and attempts < 200:
        attempts += 1
        side = int(rng.integers(int(short * min_frac), int(short * max_frac)))
        x = int(rng.integers(short // 20, width - side - short // 20))
        y = int(rng.integers(short // 20, height - side - short // 20))
        gap = side // 2
        if any(not (x + side + gap < o.box[0] or o.box[2] + gap < x or y + side + gap < o.box[1] or o.box[3] + gap < y) for o in objects):
            continue
        kind, colour = KINDS[int(rng.integers(0, len(KINDS)))], list(PALETTE)[int(rng.integers(0, len(PALETTE)))]
        objects.append(PlantedObject(kind, _draw_coloured(img, rng, kind, colour, x, y, side), colour))
    return img, objects


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 90, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, quality=quality, **kw) if fmt == "JPEG" else img.save(out, fmt, **kw)
    return out.getvalue()


DEMO_SIZES = [(2048, 1536), (3840, 2160), (2160, 3840), (4096, 3072), (2560, 1440), (3000, 2000)]


def write_demo_images(folder: str | Path, n: int = 6, seed: int = 0) -> list[Path]:
    """The built-in demo set: n labelled scenes of 2K-4K as JPEGs (objects of a named kind and colour,
    what the demo's captioner was trained on), plus two inputs the run must reject. A file that already
    holds the same bytes is left alone: its mtime is part of the ingest fingerprint, so rewriting it
    would make a second demo re-ingest everything."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = DEMO_SIZES[i % len(DEMO_SIZES)]
        img, _ = generate_labelled_scene(seed + i, w, h, n_objects=4)
        paths.append(_write_if_changed(folder / f"scene_{i:03d}.jpg", encode(img, "JPEG", quality=90)))
    small, _ = generate_scene(seed + 1000, 640, 480, n_objects=1)
    paths.append(_write_if_changed(folder / "thumbnail_too_small.jpg", encode(small)))
    paths.append(_write_if_changed(folder / "notes.jpg", b"not an image, just a text file with a .jpg name\n"))
    return paths


def _write_if_changed(path: Path, data: bytes) -> Path:
    if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
        path.write_bytes(data)
    return path


def generate_document(seed: int, width: int = 1700, height: int = 2200, n_lines: int = 12) -> tuple[Image.Image, list[PlantedObject]]:
    """A white page with lines of dark text at known places (the planted objects are the lines)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (250, 250, 246))
    draw = ImageDraw.Draw(img)
    size = max(16, height // 60)
    font = _font(size)
    lines = []
    y = height // 12
    for _ in range(n_lines):
        text = " ".join(rng.choice(WORDS, int(rng.integers(3, 8))))
        x = width // 10
        draw.text((x, y), text, fill=(15, 15, 15), font=font)
        lines.append(PlantedObject("text_line", tuple(int(v) for v in draw.textbbox((x, y), text, font=font))))
        y += int(size * rng.uniform(2.0, 3.2))
        if y > height - height // 10:
            break
    return img, lines
