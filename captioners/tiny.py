"""A tiny randomly initialised Qwen2-VL built offline (nothing is downloaded), and where the trained
one ships (SCENES_MODEL: this architecture trained on the synthetic scenes by captioners/train_tiny.py,
the demo's and the tests' captioner). The random one is what train_tiny starts from and what the
caption benchmark times.

`build_tiny_qwen2vl(folder)` writes config.json + model.safetensors (~3 MB), generation_config.json,
tokenizer.json / tokenizer_config.json (a byte-level BPE trained here on a few sentences, with the
Qwen special tokens appended), preprocessor_config.json / video_preprocessor_config.json and the
chat template, so that both transformers (AutoProcessor + Qwen2VLForConditionalGeneration) and vLLM
load the folder. Needs torch, transformers (>=5) and tokenizers; the Qwen2-VL processor imports
torchvision (see setup_torchvision_cpu.sh for CPU-only machines).
"""

from __future__ import annotations

from pathlib import Path

# The Qwen2 special tokens, in Qwen's order; they are appended after the trained BPE vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's chat template (content either a string or a list of typed parts; one
# <|vision_start|><|image_pad|><|vision_end|> per image part, which the processor expands).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "A photo of a red car parked on a quiet street next to a green tree.",
    "Two people are walking a dog along the beach at sunset.",
    "The image shows a wooden table with a cup of coffee and an open book.",
    "A close-up of a cat sleeping on a blue sofa in a bright living room.",
    "Mountains covered with snow rise above a lake under a cloudy sky.",
    "A crowded market with fruit, vegetables and colourful signs.",
    "Describe the picture in one sentence. What is shown in this region?",
    "There is text on the sign: open 24 hours. Numbers 0 1 2 3 4 5 6 7 8 9.",
    "You are a helpful assistant. The user asks for a short caption of the image.",
    "A white boat, a small house, a black bird and a yellow flower in the garden.",
]

SCENES_MODEL = Path(__file__).with_name("models") / "tiny-scenes"  # the trained one (captioners/train_tiny.py)

PATCH, MERGE, TEMPORAL = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 64  # <= 64 LLM tokens per image


def _train_tokenizer(vocab_size: int = 400, corpus: list[str] | None = None):
    """A byte-level BPE trained on _CORPUS (and `corpus`) with Qwen2's pre-tokenizer; returns (vocab, merges)."""
    import json

    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((_CORPUS + list(corpus or [])) * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_tiny_qwen2vl(folder: Path, seed: int = 0, corpus: list[str] | None = None, vocab_size: int = 400,
                       max_pixels: int = MAX_PIXELS) -> Path:
    """Build and save the tiny random Qwen2-VL in `folder` (created if needed); returns `folder`.
    `corpus`: more text for the tokenizer (e.g. the captions a trained model is to write);
    `max_pixels`: the processor's per-image budget (28·28 pixels per visual token)."""
    import torch
    from tokenizers import AddedToken
    from transformers import (
        GenerationConfig,
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    vocab, merges = _train_tokenizer(vocab_size, corpus)
    base = len(vocab)
    for i, token in enumerate(SPECIAL_TOKENS):  # ids base .. base+13, in Qwen's order
        vocab[token] = base + i
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", bos_token=None, model_max_length=32768,
                               errors="replace", clean_up_tokenization_spaces=False, split_special_tokens=False)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert ids == {t: base + i for i, t in enumerate(SPECIAL_TOKENS)}, ids
    vocab_size = len(tokenizer)
    assert vocab_size == base + len(SPECIAL_TOKENS), (vocab_size, base)

    image_processor = Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                            min_pixels=MIN_PIXELS, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                            min_pixels=MIN_PIXELS, max_pixels=max_pixels)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=CHAT_TEMPLATE)

    hidden, heads, head_dim = 128, 2, 64
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=hidden, num_heads=2, mlp_ratio=4, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    assert hidden // heads == head_dim and sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        do_sample=False, num_beams=1, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)  # tokenizer files, chat_template.jinja, processor_config.json
    image_processor.save_pretrained(folder)  # preprocessor_config.json, for readers that look only there
    video_processor.save_pretrained(folder)  # video_preprocessor_config.json
    return folder


if __name__ == "__main__":
    import sys
    import time

    t0 = time.perf_counter()
    out = build_tiny_qwen2vl(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vlmwork/tiny-qwen2vl"))
    print(f"built {out} in {time.perf_counter() - t0:.1f}s")
