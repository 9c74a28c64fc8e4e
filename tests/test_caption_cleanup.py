"""Caption clean-up rules, table-driven: what is kept (and how it is rewritten) and what is rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioners.cleanup import clean_caption
from captioners.prompts import PROMPTS, resolve_prompts
from schemas.tables import CaptionStatus as S

KEPT = [
    # boilerplate openings about the prompt's pictures are removed
    ("The second image is a close-up of a red stop sign with white letters.", "A red stop sign with white letters."),
    ("The second image shows a red stop sign.", "A red stop sign."),
    ("This cropped image depicts two blue bicycles leaning on a fence.", "Two blue bicycles leaning on a fence."),
    ("In the cropped region, there is a small white cat on a mat.", "A small white cat on a mat."),
    ("In the second image, we can see a green bottle.", "A green bottle."),
    ("A close-up view of a price tag reading 4.99 on a shelf.", "A price tag reading 4.99 on a shelf."),
    ("The crop focuses on a yellow taxi at a crossing.", "A yellow taxi at a crossing."),
    ("The image is a zoomed-in view of a clock face with Roman numerals.", "A clock face with Roman numerals."),
    # content is left alone
    ("A red sign says OPEN above a wooden door.", "A red sign says OPEN above a wooden door."),
    ("Second-hand books are stacked on a table.", "Second-hand books are stacked on a table."),
    # whole sentences: a cut-off tail is trimmed; whitespace is normalised
    ("A blue car is parked. Behind it, a tall", "A blue car is parked."),
    ("  A  blue\ncar is parked.  ", "A blue car is parked."),
    ("A blue\x00 car\ufffd is parked.", "A blue car is parked."),
    ("A sign with the text 3.5 km to the port", "A sign with the text 3.5 km to the port"),
]

REJECTED = [
    ("", S.EMPTY),
    ("   \n ", S.EMPTY),
    (None, S.EMPTY),
    ("ERROR", S.ERROR_SENTINEL),
    ("[error]", S.ERROR_SENTINEL),
    ("N/A", S.ERROR_SENTINEL),
    ("null", S.ERROR_SENTINEL),
    ("Error: CUDA out of memory", S.ERROR_SENTINEL),
    ("I'm sorry, but I can't help with describing this image.", S.REFUSAL),
    ("I cannot see the second image clearly.", S.REFUSAL),
    ("As an AI, I am unable to view images.", S.REFUSAL),
    ("Unable to describe the crop.", S.REFUSAL),
    ("a red sign a red sign a red sign a red sign a red sign", S.DEGENERATE),
    ("the the the the the the the the the the the the the", S.DEGENERATE),
    ("dog cat dog cat dog cat dog cat dog cat dog cat dog cat", S.DEGENERATE),
    ("The second image shows", S.PROMPT_FRAMING),
    ("Sign.", S.TOO_SHORT),
]


@pytest.mark.parametrize(("raw", "expected"), KEPT)
def test_kept_and_rewritten(raw, expected):
    assert clean_caption(raw) == (expected, None)


@pytest.mark.parametrize(("raw", "reason"), REJECTED)
def test_rejected_with_reason(raw, reason):
    assert clean_caption(raw) == (None, reason)


def test_prompt_overrides_need_their_own_id():
    assert resolve_prompts("ps3-v1") is PROMPTS["ps3-v1"]
    with pytest.raises(ValueError, match="new captioner.prompt_id"):
        resolve_prompts("ps3-v1", local="Describe the crop.")
    custom = resolve_prompts("mine-v1", local="Describe the crop.", global_="Describe the image.")
    assert (custom.prompt_id, custom.local) == ("mine-v1", "Describe the crop.")
    with pytest.raises(ValueError, match="unknown captioner.prompt_id"):
        resolve_prompts("mine-v2", local="only one")


@pytest.mark.parametrize("raw", [
    "[Error] No caption found!", "[ERROR]", "<error> model timed out", "No caption", "No caption.", "caption not available",
    "Caption unavailable.", "No description available.", "[ERR: timeout]", "ERROR: CUDA out of memory", "The FAILED request.",
])
def test_error_markers_trainers_look_for_are_rejected(raw):
    assert clean_caption(raw) == (None, S.ERROR_SENTINEL)


@pytest.mark.parametrize("raw, kept", [
    ("A red sign on a brick wall. There is no visible text in the image.", "A red sign on a brick wall."),
    ("A blue door. No people are visible.", "A blue door."),
    ("The image contains no text. A green leaf with dew drops.", "A green leaf with dew drops."),
    ("A wooden bench. I cannot see any writing.", "A wooden bench."),
    # Absence with content beside it stays: it says what is there.
    ("There is no text, but a red arrow points left.", "There is no text, but a red arrow points left."),
    ("A sign that says no parking.", "A sign that says no parking."),
    ("A red (warning) triangle on a pole.", "A red (warning) triangle on a pole."),
    ("A crowd with no caption writers.", "A crowd with no caption writers."),
])
def test_sentences_that_only_state_absence_are_dropped(raw, kept):
    assert clean_caption(raw) == (kept, None)


def test_a_caption_that_only_states_absence_is_empty():
    assert clean_caption("There is no visible text in the image.") == (None, S.EMPTY)


CLEANUP_SET = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "captions" / "cleanup_set.json").read_text())
FAMILY_STATUS = {"token_debris": S.TOKEN_DEBRIS, "prompt_framing": S.PROMPT_FRAMING, "refusal": S.REFUSAL,
                 "error_marker": S.ERROR_SENTINEL, "degenerate": S.DEGENERATE, "absence_only": S.EMPTY}


@pytest.mark.parametrize(("family", "raw"), [(f, t) for f, texts in CLEANUP_SET["junk"].items() for t in texts])
def test_every_junk_family_of_the_benchmark_set_is_rejected_with_its_reason(family, raw):
    assert clean_caption(raw) == (None, FAMILY_STATUS[family])


@pytest.mark.parametrize("good", CLEANUP_SET["good"], ids=lambda g: g["raw"][:40])
def test_good_captions_of_the_benchmark_set_are_kept(good):
    assert clean_caption(good["raw"]) == (good.get("kept", good["raw"]), None)


@pytest.mark.parametrize(("raw", "fragment"), [
    ("The second image is a close-up of the first image.", "The first image."),
    ("This image is a cropped section of the first image.", "A cropped section of the first image."),
    ("The crop is taken from the first image.", "Taken from the first image."),
])
def test_a_caption_about_the_prompt_is_rejected_not_shortened_into_a_fragment(raw, fragment):
    """What the clean-up used to make of these: fragments that were never a sentence of the original."""
    assert clean_caption(raw) == (None, S.PROMPT_FRAMING)
    assert clean_caption(fragment) == (None, S.PROMPT_FRAMING)
