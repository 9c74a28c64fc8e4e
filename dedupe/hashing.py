"""Content hashes: the uid/sha256 of original bytes and 64-bit perceptual hashes of pixels."""

from __future__ import annotations

import hashlib

import imagehash
from PIL import Image

HASH_INPUT_SIDE = 256  # perceptual hashes look at <= 32x32 pixels; shrink big images cheaply first


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def uid_from_sha256(sha256: str) -> str:
    """The first 128 bits of the SHA-256, as 32 hex characters: a safe, stable sample key."""
    return sha256[:32]


def _to_uint64(h: imagehash.ImageHash) -> int:
    value = 0
    for bit in h.hash.flatten():
        value = (value << 1) | int(bit)
    return value


def perceptual_hashes(image: Image.Image) -> tuple[int, int]:
    """(phash, dhash) as unsigned 64-bit integers, from an already oriented image of any size."""
    small = image
    if max(small.size) > HASH_INPUT_SIDE:
        small = small.copy()
        small.thumbnail((HASH_INPUT_SIDE, HASH_INPUT_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    gray = small.convert("L")
    return _to_uint64(imagehash.phash(gray)), _to_uint64(imagehash.dhash(gray))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
