"""The per-sample JSON of the text_box tars, as PS3's loader reads it."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TextBoxSample(BaseModel):
    """`KEY.json` in text_box/text_box_NNNNNN.tar: one caption per box, same order."""

    model_config = ConfigDict(extra="forbid")

    text: list[str] = Field(default_factory=list)
    box: list[list[int]] = Field(default_factory=list)
    global_text: str | None = None
    type: Literal["natural", "document"] = "natural"

    @model_validator(mode="after")
    def _boxes_match_texts(self) -> TextBoxSample:
        if len(self.text) != len(self.box):
            raise ValueError(f"{len(self.text)} texts for {len(self.box)} boxes")
        for b in self.box:
            if len(b) != 4 or not (b[0] < b[2] and b[1] < b[3]) or min(b) < 0:
                raise ValueError(f"box {b} is not [x1, y1, x2, y2] with x1 < x2, y1 < y2, all >= 0")
        return self

    def check_inside(self, width: int, height: int) -> None:
        for b in self.box:
            if b[2] > width or b[3] > height:
                raise ValueError(f"box {b} leaves the {width}x{height} image")

    def to_json_bytes(self) -> bytes:
        """Canonical bytes: sorted keys, no spaces, so identical samples give identical tars."""
        data = self.model_dump(exclude_none=True)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def validate_sample_json(raw: bytes | str) -> TextBoxSample:
    return TextBoxSample.model_validate_json(raw)
