"""Content hashes: the uid/sha256 of original bytes and 64-bit perceptual hashes of pixels."""

from __future__ import annotations

import hashlib

import imagehash
import numpy as np
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


FINE_GRID = 16  # fine signature: 16 x 16 block means of the grey image
FINE_SCALE = 16  # z-scores are stored as int8 in steps of 1/16 (range +-8 standard deviations)


def hash_input(image: Image.Image) -> Image.Image:
    """The <= HASH_INPUT_SIDE px copy the hashes look at (the image itself when it is that small)."""
    if max(image.size) <= HASH_INPUT_SIDE:
        return image
    small = image.copy()
    small.thumbnail((HASH_INPUT_SIDE, HASH_INPUT_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return small


def perceptual_hashes(image: Image.Image) -> tuple[int, int, bytes]:
    """(phash, dhash, fine signature) from an already oriented image of any size. The 64-bit hashes
    find candidates; the fine signature confirms them: two photos that differ only in a small
    detail share their global hashes but not the block means where the detail is."""
    gray = hash_input(image).convert("L")
    return _to_uint64(imagehash.phash(gray)), _to_uint64(imagehash.dhash(gray)), fine_signature(gray)


def fine_signature(gray: Image.Image) -> bytes:
    """16 x 16 block means, normalised to zero mean and unit deviation (so brightness and contrast
    changes cancel), as 256 int8 bytes."""
    blocks = np.asarray(gray.resize((FINE_GRID, FINE_GRID), Image.Resampling.BOX), dtype=np.float32)
    z = (blocks - blocks.mean()) / max(float(blocks.std()), 1.0)
    return np.clip(np.rint(z * FINE_SCALE), -127, 127).astype(np.int8).tobytes()


def fine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest block difference, in standard deviations, between rows of int8 signatures (k x 256)."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1) / FINE_SCALE
