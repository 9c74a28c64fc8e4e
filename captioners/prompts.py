"""Caption prompts: our own wording of PS3's instructions (docs/design.md, "Captions"), versioned.

A prompt's id goes into every captions-table row, so captions written with different wordings are
never mixed up. Changing a text here means adding a new id, not editing an old one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptSet:
    prompt_id: str
    local: str  # shown with two images: the whole image, then the crop
    global_: str  # shown with the whole image only


PROMPTS: dict[str, PromptSet] = {
    "ps3-v1": PromptSet(
        prompt_id="ps3-v1",
        local=(
            "The first picture is a complete photo; the second is one region cut out of it. "
            "In one or two sentences, describe what is inside that region only, using the complete photo just "
            "for context. Name every object and read every piece of text in the region, with colours, shapes "
            "and where things are relative to each other. Describe only what is in the foreground, say nothing "
            "about things that are not there, and do not refer to 'the region', 'the crop' or 'the picture'."
        ),
        global_=(
            "Describe this photo in two or three sentences: the main subjects, their colours and shapes, any "
            "text that is visible, and how things are laid out."
        ),
    ),
    # ps3-v1 numbers the pictures ("the first ... the second ..."), and models answer in those terms ("The
    # second image is a close-up of the first image."). This wording never names them; measured with
    # benchmarks/caption_prompts.py, it becomes the default only once a real model says fewer such things.
    "ps3-v2": PromptSet(
        prompt_id="ps3-v2",
        local=(
            "Here is a photo, and after it one detail of that photo shown enlarged. Describe the detail as if it "
            "were a photo of its own, in one or two sentences that start with what is there (for example 'A red "
            "tram ...'). Name every object and read every piece of text, with colours, shapes and where things "
            "are relative to each other. Say nothing about things that are not there, and never mention images, "
            "pictures, photos, crops, regions, views or where the detail sits in the photo."
        ),
        global_=(
            "Describe this photo in two or three sentences: the main subjects, their colours and shapes, any "
            "text that is visible, and how things are laid out."
        ),
    ),
}

DEFAULT_PROMPT_ID = "ps3-v1"


def resolve_prompts(prompt_id: str, local: str | None = None, global_: str | None = None) -> PromptSet:
    """The named prompt set, with either text overridden from the config. An override without a new
    prompt_id would silently share an id with the stock wording, so it is refused."""
    if (local or global_) and prompt_id in PROMPTS:
        raise ValueError(f"captioner prompts are overridden: give them a new captioner.prompt_id (not {prompt_id!r})")
    if prompt_id in PROMPTS:
        return PROMPTS[prompt_id]
    if not (local and global_):
        raise ValueError(f"unknown captioner.prompt_id {prompt_id!r}: use one of {sorted(PROMPTS)} or set both "
                         "captioner.local_prompt and captioner.global_prompt")
    return PromptSet(prompt_id, local, global_)
