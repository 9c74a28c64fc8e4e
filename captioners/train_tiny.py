"""Train the tiny scene captioner: a small Qwen2-VL that names what pipeline/synthetic.py planted.

Run offline by a developer (not at test time), on CPU in minutes:

    python -m captioners.train_tiny captioners/models/tiny-scenes

It builds the tiny Qwen2-VL of captioners/tiny.py (same processor, chat template and two-image
prompt as a real model, so the transformers and vLLM back ends run it unchanged), with a tokenizer
that also knows the caption words, and trains it on labelled scenes (generate_labelled_scene):
requests built by the pipeline's own captioners.requests.build_requests with the stock ps3-v1
prompts, for crops around each planted object (jittered), crops of plain background, and the whole
image. Targets come from what was planted: "a red checker pattern", "plain background", and for
the global caption "a scene with a red checker pattern, a blue noise patch and a green text card".
It knows nothing else: on any other picture its captions are made-up scene words.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from captioners.prompts import PROMPTS
from captioners.requests import CaptionRequest, build_requests
from dedupe.regions import iou
from pipeline.synthetic import (
    KINDS,
    PALETTE,
    PlantedObject,
    encode,
    generate_labelled_scene,
)

KIND_WORDS = {"checker": "checker pattern", "noise": "noise patch", "shapes": "cluster of shapes", "text": "text card"}
BACKGROUND = "plain background"
PROMPT_ID = "ps3-v1"
MAX_PIXELS = 256 * 28 * 28  # captioner.max_pixels' default: the views the pipeline builds


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def phrase(obj: PlantedObject) -> str:
    return f"{article(obj.colour)} {obj.colour} {KIND_WORDS[obj.kind]}"


def listing(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def local_caption(objects: list[PlantedObject], box: list[int]) -> str:
    """The planted objects mostly (>= half their area) inside `box`, else plain background."""
    inside = []
    for o in objects:
        ix = max(0, min(box[2], o.box[2]) - max(box[0], o.box[0]))
        iy = max(0, min(box[3], o.box[3]) - max(box[1], o.box[1]))
        if ix * iy >= 0.5 * (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]):
            inside.append(o)
    return listing([phrase(o) for o in inside]) if inside else BACKGROUND


def global_caption(objects: list[PlantedObject]) -> str:
    return "a scene with " + listing([phrase(o) for o in objects]) if objects else "a scene with " + BACKGROUND


def _overlaps(box, objects) -> bool:
    return any(iou(box, o.box) > 0 for o in objects)


def scene_requests(seed: int, width: int = 1024, height: int = 768, n_objects: int = 3,
                   background_crops: int = 1) -> list[tuple[CaptionRequest, str]]:
    """(request, target caption) for one labelled scene: a jittered crop per object, background crops,
    and the global request, built exactly as the caption stage builds them."""
    img, objects = generate_labelled_scene(seed, width, height, n_objects)
    rng = random.Random(seed)
    boxes = []
    for o in objects:
        side = o.box[2] - o.box[0]
        m = [int(side * rng.uniform(-0.05, 0.3)) for _ in range(4)]
        boxes.append([max(0, o.box[0] - m[0]), max(0, o.box[1] - m[1]), min(width, o.box[2] + m[2]), min(height, o.box[3] + m[3])])
    for _ in range(20 * background_crops):
        if sum(not _overlaps(b, objects) for b in boxes) >= background_crops:
            break
        s = rng.randint(min(width, height) // 10, min(width, height) // 4)
        x, y = rng.randint(0, width - s), rng.randint(0, height - s)
        if not _overlaps([x, y, x + s, y + s], objects):
            boxes.append([x, y, x + s, y + s])
    prompts = PROMPTS[PROMPT_ID]
    reqs = build_requests(f"scene-{seed}", encode(img), width, height, boxes, prompts.local, prompts.global_, MAX_PIXELS)
    return [(r, local_caption(objects, r.box) if r.box is not None else global_caption(objects)) for r in reqs]


def caption_corpus() -> list[str]:
    """Every caption word, for the tokenizer."""
    return ([f"{article(c)} {c} {k}" for c in PALETTE for k in KIND_WORDS.values()] + [BACKGROUND, "a scene with", " and ", ", "]
            + [PROMPTS[PROMPT_ID].local, PROMPTS[PROMPT_ID].global_])


class Batcher:
    """Model inputs with labels on the answer (and its end token) only."""

    def __init__(self, processor):
        self.processor = processor

    def prompt(self, request: CaptionRequest) -> str:
        from captioners.messages import chat_messages

        return self.processor.apply_chat_template(chat_messages(request, lambda img: {"type": "image"}), tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, items: list[tuple[CaptionRequest, str]]):
        proc = self.processor
        proc.tokenizer.padding_side = "right"
        prompts = [self.prompt(r) for r, _ in items]
        images = [r.images for r, _ in items]
        enc = proc(text=[p + t + "<|im_end|>" for p, (_, t) in zip(prompts, items)], images=images, return_tensors="pt", padding=True)
        answer = [len(proc.tokenizer(t + "<|im_end|>")["input_ids"]) for _, t in items]
        labels = enc["input_ids"].clone()
        lengths = enc["attention_mask"].sum(1).tolist()
        for i, (n, a) in enumerate(zip(lengths, answer)):
            labels[i, : n - a] = -100
            labels[i, n:] = -100
        enc["labels"] = labels
        return enc


def train(folder: Path, steps: int = 7000, batch_size: int = 8, lr: float = 1e-3, scenes: int = 1000, seed: int = 0) -> dict:
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from captioners.tiny import build_tiny_qwen2vl

    t0 = time.perf_counter()
    folder = Path(folder)
    # 16 visual tokens an image (112x112 px): enough to tell the kinds and colours apart, and a short
    # sequence for a 2-layer model to find them in.
    build_tiny_qwen2vl(folder, seed=seed, corpus=caption_corpus(), vocab_size=500, max_pixels=28 * 28 * 16)
    processor = AutoProcessor.from_pretrained(folder)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    pool = [item for s in range(scenes) for item in scene_requests(10_000 + s)]
    batcher = Batcher(processor)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batcher(rng.sample(pool, batch_size))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(folder)
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "scenes": scenes, "examples": len(pool),
            "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4), "seconds": round(time.perf_counter() - t0, 1)}


def evaluate(folder: Path, seeds: range = range(0, 40), width: int = 1024, height: int = 768) -> dict:
    """Greedy captions of held-out scenes (seeds below the training range) by the transformers back
    end itself: the share of planted objects whose crop caption names their kind and their colour,
    of background crops captioned plain background, and of global captions that name every object."""
    from captioners.transformers_backend import TransformersBackend
    from schemas.config import CaptionerSection

    backend = TransformersBackend(CaptionerSection(backend="transformers", model=str(folder), device="cpu", temperature=0,
                                                   max_new_tokens=48))
    kinds = colours = objects = background = backgrounds = globals_ok = n_global = 0
    examples = []
    for seed in seeds:
        items = scene_requests(seed, width, height)
        results = backend.caption([r for r, _ in items])
        for (req, target), res in zip(items, results):
            text = (res.text or "").strip()
            if len(examples) < 12:
                examples.append({"target": target, "caption": text})
            if req.box is None:
                n_global += 1
                globals_ok += text == target
            elif target == BACKGROUND:
                backgrounds += 1
                background += text == BACKGROUND
            else:
                for part in target.split(" and "):
                    for p in part.split(", "):
                        objects += 1
                        colour, kind = p.split(" ", 2)[1], p.split(" ", 2)[2]
                        colours += colour in text
                        kinds += kind in text
    return {"objects": objects, "kind_accuracy": round(kinds / max(objects, 1), 4), "colour_accuracy": round(colours / max(objects, 1), 4),
            "background_accuracy": round(background / max(backgrounds, 1), 4), "global_exact": round(globals_ok / max(n_global, 1), 4),
            "examples": examples}


MODEL_CARD = """# tiny-scenes: a tiny Qwen2-VL that captions localcap's synthetic scenes

A {params:,}-parameter Qwen2-VL (the architecture, processor and chat template of captioners/tiny.py:
2-layer ViT of width 64, 2-layer language model of width 128, a byte-level BPE of {vocab} tokens)
trained from random weights by `python -m captioners.train_tiny` on scenes of
`pipeline.synthetic.generate_labelled_scene`. It knows only those scenes: {kinds} kinds of objects
({kind_words}) in one of {n_colours} colours ({colours}) on smooth backgrounds; its processor
shrinks each image to at most 112x112 pixels (16 visual tokens). Asked with the ps3-v1 prompts (the
whole image plus a crop), it names the objects in the crop ("a red checker pattern") and says "plain
background" for a crop without one. Its global captions ("a scene with ...") name objects of the
scene's kinds and colours but seldom the exact list (global_exact below). It reads no text, and on
any other picture its captions are made-up scene words.

Training: {train}

Held-out scenes (seeds 0-{last}, never trained on), greedy, through the transformers back end:
{eval}

Rebuild: `python -m captioners.train_tiny captioners/models/tiny-scenes --steps {steps}` (CPU).
"""


def write_card(folder: Path, training: dict, scores: dict) -> None:
    from math import prod

    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), "np") as f:  # shapes only, from the header
        params = sum(prod(f.get_slice(k).get_shape()) for k in f.keys())
    vocab = len(json.loads((Path(folder) / "tokenizer.json").read_text())["model"]["vocab"])
    card = MODEL_CARD.format(params=params, vocab=vocab, kinds=len(KINDS), kind_words=", ".join(KIND_WORDS.values()),
                             n_colours=len(PALETTE), colours=", ".join(PALETTE), train=json.dumps(training),
                             last=scores.get("last_seed", 39), eval=json.dumps({k: v for k, v in scores.items() if k != "examples"}),
                             steps=training["steps"])
    (Path(folder) / "README.md").write_text(card)
    (Path(folder) / "training.json").write_text(json.dumps({"training": training, "held_out": scores}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--steps", type=int, default=7000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scenes", type=int, default=1000)
    ap.add_argument("--eval-scenes", type=int, default=40)
    args = ap.parse_args()
    training = train(args.folder, args.steps, args.batch_size, args.lr, args.scenes)
    scores = evaluate(args.folder, range(args.eval_scenes))
    scores["last_seed"] = args.eval_scenes - 1
    write_card(args.folder, training, scores)
    print(json.dumps({"training": training, "held_out": scores}, indent=1))


if __name__ == "__main__":
    main()
