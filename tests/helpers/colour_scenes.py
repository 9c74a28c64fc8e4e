"""Scenes whose captions are known, for trainer tests: textured colour patches on a grey ground, and
an OpenAI-compatible chat server that captions what it is shown by naming the colours in it (the
generator's knowledge standing in for a VLM, so that retrieval has a right answer)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers.http_server import QuietHandler, serve

COLOURS = {"red": (220, 30, 30), "yellow": (230, 210, 20), "green": (30, 190, 40), "cyan": (20, 200, 210),
           "blue": (30, 50, 220), "magenta": (210, 30, 200)}
HUES = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "magenta": 300}


def colour_scene(seed: int, width: int = 800, height: int = 600, n_patches: int = 3) -> Image.Image:
    """Grey textured ground with n small checkered patches of distinct colours."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(128, 6, (height, width, 1)).repeat(3, 2), 0, 255)
    side = min(width, height) // 7
    names = rng.choice(list(COLOURS), n_patches, replace=False)
    placed: list[tuple[int, int]] = []
    for name in names:
        for _ in range(100):
            x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            if all(abs(x - px) > side * 1.6 or abs(y - py) > side * 1.6 for px, py in placed):
                break
        placed.append((x, y))
        yy, xx = np.mgrid[0:side, 0:side]
        checker = (((yy // 8) + (xx // 8)) % 2)[..., None]
        colour = np.array(COLOURS[name], dtype=np.float64)
        img[y:y + side, x:x + side] = colour * (0.6 + 0.4 * checker)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def write_colour_scenes(folder: Path, n: int, **kw) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"scene-{i:03d}.jpg"
        colour_scene(i, **kw).save(path, quality=92)
        paths.append(path)
    return paths


def colours_in(img: Image.Image, min_share: float = 0.01) -> list[str]:
    """Colour names of the saturated pixels, most frequent first (those above min_share of the image)."""
    hsv = np.asarray(img.convert("HSV"), dtype=np.float64)
    saturated = (hsv[..., 1] > 110) & (hsv[..., 2] > 60)
    if not saturated.any():
        return []
    hue = hsv[..., 0][saturated] * 360 / 255
    names = list(HUES)
    centres = np.array([HUES[n] for n in names])
    nearest = np.abs((hue[:, None] - centres[None, :] + 180) % 360 - 180).argmin(1)
    counts = np.bincount(nearest, minlength=len(names))
    share = counts / saturated.size
    return [names[i] for i in np.argsort(-counts) if share[i] >= min_share]


def caption_for(images: list[Image.Image]) -> str:
    """Local requests (whole image, crop): the crop's main colour; global requests: every colour."""
    if len(images) > 1:
        found = colours_in(images[-1])
        return f"A {found[0]} checkered patch." if found else "Plain grey ground."
    found = sorted(colours_in(images[0], 0.003))
    return ("Patches in " + ", ".join(found) + ".") if found else "Plain grey ground."


class ColourCaptionServer:
    """/v1/chat/completions answering with caption_for the request's images."""

    def __init__(self):
        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                parts = body["messages"][-1]["content"]
                images = [Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])))
                          for p in parts if p.get("type") == "image_url"]
                payload = json.dumps({"choices": [{"message": {"content": caption_for(images)}}],
                                      "usage": {"prompt_tokens": 10, "completion_tokens": 5}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd, root = serve(Handler)
        self.base_url = root + "/v1"

    def close(self) -> None:
        self.httpd.shutdown()
