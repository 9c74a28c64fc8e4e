"""The shipped tiny scene captioner (captioners/models/tiny-scenes) sees: on held-out labelled scenes
its captions of boxes around planted objects name their kind and colour, and the clean-up keeps
every caption it was trained to write."""

from __future__ import annotations

import json

import pytest

from captioners.cleanup import clean_caption
from captioners.tiny import SCENES_MODEL
from captioners.train_tiny import BACKGROUND, KIND_WORDS, evaluate, global_caption, listing, phrase
from pipeline.synthetic import KINDS, PALETTE, PlantedObject

THRESHOLD = 0.9  # the goal; the model card records what training measured on 40 held-out scenes


def test_the_shipped_model_is_complete_and_says_what_it_knows():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "README.md"):
        assert (SCENES_MODEL / name).is_file(), name
    card = (SCENES_MODEL / "README.md").read_text()
    assert "generate_labelled_scene" in card and "python -m captioners.train_tiny" in card
    held_out = json.loads((SCENES_MODEL / "training.json").read_text())["held_out"]
    assert held_out["kind_accuracy"] >= THRESHOLD and held_out["colour_accuracy"] >= THRESHOLD


@pytest.mark.slow
def test_captions_of_held_out_scenes_name_kind_and_colour(scene_vlm):
    # Seeds 0-11: the training scenes start at 10000.
    scores = evaluate(scene_vlm, range(12))
    assert scores["objects"] >= 30
    assert scores["kind_accuracy"] >= THRESHOLD, scores
    assert scores["colour_accuracy"] >= THRESHOLD, scores
    assert scores["background_accuracy"] >= 0.8, scores


def test_the_clean_up_keeps_every_correct_caption():
    objects = [PlantedObject(k, (0, 0, 1, 1), c) for k in KINDS for c in PALETTE]
    targets = [phrase(o) for o in objects] + [BACKGROUND, global_caption(objects[:3]), global_caption(objects[5:9]),
                                              listing([phrase(objects[0]), phrase(objects[7])])]
    for target in targets:
        text, reason = clean_caption(target)
        assert reason is None and text.lower() == target, (target, text, reason)
    assert set(KIND_WORDS) == set(KINDS)
