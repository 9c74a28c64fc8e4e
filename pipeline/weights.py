"""Model weights are local or nothing: localcap never downloads them (a run would otherwise fetch
gigabytes mid-stage, or hang without network)."""

from __future__ import annotations

import os
from pathlib import Path


class WeightsMissing(ValueError):
    """The configured weights are neither a saved folder nor in the local Hugging Face cache."""


def local_weights(model: str, field: str, hint: str) -> str:
    """`model` as a saved directory (with config.json) or a Hub id already in the local cache;
    WeightsMissing otherwise: localcap never downloads weights."""
    if os.path.isdir(model):
        if not (Path(model) / "config.json").is_file():
            raise WeightsMissing(f"{field} {model!r} is a directory without config.json: not a saved model")
        return model
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise WeightsMissing(f"{field} {model!r}: no such directory")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise WeightsMissing(f"{field} {model!r} is neither a folder nor in the local Hugging Face cache, and localcap never "
                             f"downloads weights: fetch them once (`huggingface-cli download {model}`) or give a saved model directory{hint}")
    return model
