"""Caption clean-up and rejection: what a VLM says is not always a caption.

`clean_caption(text)` returns (cleaned text, None) or (None, reason). Reasons are a fixed
vocabulary (schemas.tables.CaptionStatus) so that the captions table can be counted by them. A caption
is rewritten only where what is left is still whole sentences about the picture (an opening such as
"The second image shows" removed); anything else that is wrong with it rejects it: shortening a
caption into a fragment changes what it says.
"""

from __future__ import annotations

import re
from collections import Counter

from schemas.tables import CaptionStatus

# Openings that talk about the prompt's pictures instead of the content ("The second image is a
# close-up of a red sign" -> "A red sign"). Applied repeatedly, longest first.
_SUBJECT = r"(?:the\s+|this\s+|that\s+)?(?:second|2nd|last|cropped|zoomed[- ]in|close[- ]up|enlarged|magnified)?\s*" \
           r"(?:image|picture|photo|crop|region|cropped\s+(?:area|section|region|image)|close[- ]up|view|section|area|part)"
_VERB = r"(?:is|shows|showcases|depicts|displays|features|contains|presents|captures|highlights|reveals|focuses\s+on)"
_BOILERPLATE = [
    re.compile(rf"^{_SUBJECT}\s+{_VERB}\s+(?:a\s+)?(?:close[- ]up|zoomed[- ]in\s+view|detailed\s+view|view|portion|section|part)\s+of\s+", re.IGNORECASE),
    re.compile(rf"^{_SUBJECT}\s+{_VERB}\b\s*", re.IGNORECASE),
    re.compile(rf"^(?:in|within|inside)\s+{_SUBJECT}\s*,?\s*(?:(?:we\s+(?:can\s+)?see|there\s+(?:is|are))\s+)?", re.IGNORECASE),
    re.compile(r"^(?:a\s+)?(?:close[- ]up|zoomed[- ]in)\s+(?:view|shot|image|photo)?\s*of\s+", re.IGNORECASE),
]
_REFUSAL = re.compile(
    r"^(?:i'?m\s+sorry|sorry,|i\s+(?:cannot|can't|can\s+not|am\s+unable|'m\s+unable|am\s+not\s+able)|as\s+an\s+ai|"
    r"i\s+do\s+not\s+have|i\s+don't\s+have|unable\s+to\s+(?:see|describe|view))", re.IGNORECASE)
_SENTINEL = re.compile(r"^\s*(?:\[?error\]?|<error>|error:.*|n/?a|none|null|nan|undefined|<unk>|\[\s*\]|\{\s*\})\s*\.?\s*$", re.IGNORECASE)
# Error markers a caption must never carry (trainers look for them: "[Error] No caption found!"): a
# bracketed marker in any case, an upper-case one anywhere, or a sentence saying there is no caption.
_ERROR_MARKER = re.compile(
    r"[\[<]\s*(?:error|err|fail(?:ed|ure)?|exception|invalid|warning|no\s+caption|n/?a|null|none|unknown)\b[^\]>]*[\]>]"
    r"|(?-i:\b(?:ERROR|FAILED|FAILURE|EXCEPTION|TRACEBACK|NO CAPTION)\b)"
    r"|\bno\s+(?:caption|description)s?(?:\s+(?:was\s+|were\s+|is\s+)?(?:found|available|generated|provided|possible)\b|\s*[.!]*\s*$)"
    r"|\b(?:caption|description)s?\s+(?:is\s+|are\s+)?(?:not\s+(?:available|found|generated|provided)|unavailable|missing|failed)\b",
    re.IGNORECASE)
# A sentence that only says something is absent ("There is no visible text in the image."): PS3's
# loader deletes a last sentence that mentions visible text, and our prompts ask for no such statements.
_ABSENCE = re.compile(
    r"^(?:there\s+(?:is|are|appears?\s+to\s+be|seems?\s+to\s+be)\s+no\b"
    r"|no\s+(?:\w+\s+){0,3}(?:is|are|can\s+be|could\s+be)\s+(?:visible|present|seen|shown|discernible|legible|readable)\b"
    r"|(?:the\s+)?(?:image|picture|photo|crop|region|scene)\s+(?:contains|shows|has|features|includes|displays)\s+no\b"
    r"|(?:the\s+)?(?:image|picture|photo|crop|region|scene)\s+(?:does|do)\s+not\s+(?:contain|show|have|include|feature|display)\b"
    r"|(?:i\s+)?(?:can(?:not|'t)|could\s+not|couldn't)\s+(?:see|find|make\s+out|read)\b)",
    re.IGNORECASE)
_CONTRAST = re.compile(r"\b(?:but|while|whereas|although|though|however|except|apart\s+from|only)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?=[\"')\]]*(?:\s|$))")
_WORD = re.compile(r"\w+", re.UNICODE)
# Special tokens of the common tokenizers ("<unk>", "<pad>", "<|endoftext|>", "<|im_end|>", "</s>",
# "[PAD]"): in a decoded caption they mean the detokenizer kept them or the chat template is wrong, and
# the words around them are not to be trusted either.
_SPECIAL_TOKEN = re.compile(
    r"<\|[^|<>\s]{1,40}\|>|</?(?:unk|pad|s|eos|bos|mask|sep|cls|image|img|start_of_turn|end_of_turn)>"
    r"|(?-i:\[(?:UNK|PAD|CLS|SEP|MASK)\])", re.IGNORECASE)
# References to the prompt's own pictures rather than to what is in them: the other image of the pair,
# the crop, the highlighted region, the zoomed-in view. A caption about the request is no caption.
_FRAMING = re.compile(
    r"\b(?:the|this|that|these|those)\s+(?:first|second|third|1st|2nd|other|previous|former|latter|original|full|complete"
    r"|larger|reference|input|provided|given)\s+(?:image|picture|photo|photograph|view|frame)s?\b"
    r"|\b(?:both|the\s+two)\s+(?:images|pictures|photos)\b"
    r"|\b(?:in|within|inside|of|from)\s+(?:the|this)\s+crop\b(?!s)|^(?:the|this)\s+crop\b(?!s)"
    r"|\b(?:the|this|that|a)\s+cropped\s+(?:image|picture|photo|area|section|region|part|portion|view|version)\b"
    r"|\b(?:highlighted|marked|selected|outlined|boxed|specified|indicated)\s+(?:region|area|section|box|part|portion|rectangle)\b"
    r"|\b(?:zoomed[- ]in|enlarged|magnified)\s+(?:view|image|version|section|region|portion|part|crop|picture)\b"
    r"|\b(?:the|this|that)\s+region\b(?!\s+of\b)"
    r"|\bthe\s+close[- ]?up\b",
    re.IGNORECASE)
# Control characters and U+FFFD (a token sequence that ended inside a UTF-8 character; where it lands
# differs between detokenizers) carry nothing a caption needs.
_JUNK_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


def normalise_text(text: str) -> str:
    """Junk characters removed, whitespace collapsed to single spaces."""
    return " ".join(_JUNK_CHARS.sub("", text).split())


def strip_boilerplate(text: str) -> str:
    changed = True
    while changed:
        changed = False
        for pattern in _BOILERPLATE:
            new = pattern.sub("", text, count=1)
            if new != text:
                text, changed = new.lstrip(" ,:;-"), True
    return text[:1].upper() + text[1:] if text else text


def whole_sentences(text: str) -> str:
    """Cut a generation that stopped mid-sentence (the token limit) after its last full sentence;
    a text with no sentence end at all is kept as it is."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] < len(text.rstrip()):
        return text[: ends[-1]].strip()
    return text.strip()


def sentences(text: str) -> list[str]:
    """The sentences of a text (a tail without an end mark counts as one)."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[start:m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    return [s for s in out + ([tail] if tail else []) if s]


def drop_absence_statements(text: str) -> str:
    """The text without sentences that only state what is not there."""
    return " ".join(s for s in sentences(text) if not (_ABSENCE.match(s) and not _CONTRAST.search(s)))


def is_degenerate(text: str, n: int = 3, max_repeats: int = 3, min_unique_ratio: float = 0.3) -> bool:
    """Looping output: one word n-gram repeated more than max_repeats times, or too few distinct
    words in a long text."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) >= n:
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        if grams.most_common(1)[0][1] > max_repeats:
            return True
    return len(words) >= 12 and len(set(words)) / len(words) < min_unique_ratio


def about_the_picture(sentence: str, min_words: int = 2) -> str | None:
    """The sentence with any opening about the prompt's pictures removed ("The second image shows a
    red sign." -> "A red sign."), or None when a reference to the prompt's framing would remain: "The
    second image is a close-up of the first image." is not shortened to "The first image."."""
    rewritten = strip_boilerplate(sentence)
    if _FRAMING.search(rewritten) or len(_WORD.findall(rewritten)) < min_words:
        return None if _FRAMING.search(sentence) else rewritten
    return rewritten


def clean_caption(text: str | None, min_words: int = 2) -> tuple[str | None, CaptionStatus | None]:
    text = normalise_text(text or "")
    if not text:
        return None, CaptionStatus.EMPTY
    if _SPECIAL_TOKEN.search(text):
        return None, CaptionStatus.TOKEN_DEBRIS
    if _SENTINEL.match(text) or _ERROR_MARKER.search(text):
        return None, CaptionStatus.ERROR_SENTINEL
    if _REFUSAL.match(text):
        return None, CaptionStatus.REFUSAL
    if is_degenerate(text):
        return None, CaptionStatus.DEGENERATE
    kept = [about_the_picture(s, min_words) for s in sentences(drop_absence_statements(whole_sentences(text)))]
    if None in kept:
        return None, CaptionStatus.PROMPT_FRAMING
    text = " ".join(s for s in kept if s)
    if len(_WORD.findall(text)) < min_words:
        return None, CaptionStatus.EMPTY if not text else CaptionStatus.TOO_SHORT
    return text, None
