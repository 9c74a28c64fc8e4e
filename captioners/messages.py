"""The one chat-message builder every back end uses (OpenAI chat format with images)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

from PIL import Image

from captioners.requests import CaptionRequest

ImagePart = Callable[[Image.Image], dict]


def chat_messages(request: CaptionRequest, image_part: ImagePart) -> list[dict]:
    """A single user turn: the request's images (whole, then crop), then its prompt."""
    content = [image_part(img) for img in request.images]
    content.append({"type": "text", "text": request.prompt})
    return [{"role": "user", "content": content}]


def data_url(img: Image.Image, fmt: str = "jpeg", quality: int = 92) -> str:
    out = io.BytesIO()
    if fmt == "png":
        img.save(out, "PNG", compress_level=1)
    else:
        img.save(out, "JPEG", quality=quality)
    return f"data:image/{fmt};base64," + base64.b64encode(out.getvalue()).decode()


def url_part(fmt: str = "jpeg") -> ImagePart:
    """Images as data URLs, for HTTP servers."""
    return lambda img: {"type": "image_url", "image_url": {"url": data_url(img, fmt)}}


def pil_part(img: Image.Image) -> dict:
    """Images as PIL objects, for in-process engines (no encoding)."""
    return {"type": "image_pil", "image_pil": img}
