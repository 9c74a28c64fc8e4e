"""Caption text for training: a tokenizer (the pretrained model's, a given one, or a small BPE trained
on the dataset's own captions when training from scratch) and the captions read from text_box tars
alone (an image tar is never opened to learn a vocabulary)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from pipeline.shards.loader import ShardDataset
from pipeline.shards.reader import read_tar_groups
from pipeline.storage import join

SPECIALS = ["[PAD]", "[UNK]", "[EOS]"]


def iter_captions(dataset: ShardDataset, shards: list[str] | None = None) -> Iterator[str]:
    """Every box caption and global caption of these shards (default: all; text tars only for paired)."""
    for shard in dataset.shards if shards is None else shards:
        for _key, group in read_tar_groups(dataset.storage, join(dataset.tars_at, *dataset.text_tar(shard))):
            meta = json.loads(group["json"])
            yield from (t for t in meta.get("text", []) if t)
            if meta.get("global_text"):
                yield meta["global_text"]


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> str:
    """A lower-cased word-piece-free BPE over whitespace/punctuation words; its tokenizer.json text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False))
    return tok.to_str()


def load_tokenizer(tokenizer_json: str | None = None, path: str | None = None):
    """A transformers fast tokenizer from tokenizer.json text (ours) or a local directory (pretrained)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path:
        return AutoTokenizer.from_pretrained(path)
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


def encode(tokenizer, texts: list[str], max_len: int):
    """Token ids padded to max_len (SigLIP's text tower pools the last position, so always full length)."""
    return tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")["input_ids"]
