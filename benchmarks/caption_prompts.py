"""Does a prompt wording invite captions about the prompt's own pictures? The same regions captioned
with each wording (captioners/prompts.py), every caption put through the clean-up, and counted by
clean-up status: how many are `prompt_framing` ("The second image is a close-up of the first image."),
how many are rejected for any reason, how many pass.

Regions: the proposer's boxes (default config) on the committed real pictures (tests/data/real) and
on the demo's labelled scenes. Greedy decoding, transformers back end.

    python benchmarks/caption_prompts.py [--model DIR] [--prompts ps3-v1,ps3-v2] [--device cpu|cuda]

The default model is the demo's tiny captioner (captioners/models/tiny-scenes), which was trained
with ps3-v1 on planted-object words only: it shows that the measurement runs, not how a real VLM
answers; for that, give --model a real one (for example Qwen2-VL-2B-Instruct from the local cache).

Last lines, machine-readable, one per wording:
    BENCH framing_share_<prompt_id>=...   (share of local captions rejected as prompt_framing)
    BENCH rejected_share_<prompt_id>=...
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioners.cleanup import clean_caption  # noqa: E402
from captioners.prompts import PROMPTS  # noqa: E402
from captioners.requests import build_requests  # noqa: E402
from pipeline.ingest.decode import Rejection, decode_validate  # noqa: E402
from pipeline.regions.proposers import make_proposer  # noqa: E402
from pipeline.synthetic import encode, generate_labelled_scene  # noqa: E402
from schemas.config import CaptionerSection, IngestSection, RegionsSection  # noqa: E402
from schemas.tables import CaptionStatus  # noqa: E402


def pictures(n_scenes: int) -> list[tuple[str, bytes]]:
    out = [(p.name, p.read_bytes()) for p in sorted((ROOT / "tests" / "data" / "real").iterdir())
           if p.suffix.lower() in {".jpg", ".png", ".webp"}]
    for i in range(n_scenes):
        img = generate_labelled_scene(i)[0]
        out.append((f"scene-{i}", encode(img, "JPEG", quality=90)))
    return out


def regions(name: str, data: bytes, proposer) -> tuple[int, int, list[list[int]]]:
    """What the pipeline would caption: ingest's decode, then the proposer on its thumbnail."""
    row = decode_validate(data, name, IngestSection(min_side=256, max_pixels=200_000_000))
    if isinstance(row, Rejection):
        return 0, 0, []
    proposal = proposer(row["image"], row["width"], row["height"], row["thumb"])
    return row["width"], row["height"], [list(map(int, b)) for b in proposal.boxes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "captioners" / "models" / "tiny-scenes"))
    ap.add_argument("--prompts", default="ps3-v1,ps3-v2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from captioners.transformers_backend import TransformersBackend

    proposer = make_proposer(RegionsSection())
    work = []
    for name, data in pictures(args.scenes):
        w, h, boxes = regions(name, data, proposer)
        if boxes:
            work.append((name, data, w, h, boxes))
    backend = TransformersBackend(CaptionerSection(backend="transformers", model=args.model, device=args.device,
                                                   max_new_tokens=args.max_new_tokens))
    figures = {}
    for prompt_id in args.prompts.split(","):
        prompt = PROMPTS[prompt_id]
        reqs = [r for name, data, w, h, boxes in work for r in build_requests(name, data, w, h, boxes, prompt.local, None,
                                                                              backend.cfg.max_pixels)]
        statuses, examples = Counter(), {}
        for i in range(0, len(reqs), 16):
            for res in backend.caption(reqs[i:i + 16]):
                text, status = clean_caption(res.text)
                key = status.value if status else "ok"
                statuses[key] += 1
                examples.setdefault(key, res.text)
        n = sum(statuses.values())
        figures[prompt_id] = (statuses[CaptionStatus.PROMPT_FRAMING.value] / n, (n - statuses["ok"]) / n)
        print(f"{prompt_id}: {n} local captions on {len(work)} pictures: " + ", ".join(f"{k} {v}" for k, v in statuses.most_common()))
        for key, text in examples.items():
            print(f"    e.g. {key}: {text[:120]!r}")
    backend.close()
    for prompt_id, (framing, rejected) in figures.items():
        print(f"BENCH framing_share_{prompt_id.replace('-', '_')}={framing:.3f}")
        print(f"BENCH rejected_share_{prompt_id.replace('-', '_')}={rejected:.3f}")


if __name__ == "__main__":
    main()
