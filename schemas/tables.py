"""Pyarrow schemas of every stage table (docs/design.md, "Stage tables").

Stage code builds its tables with these schemas, so a column that drifts fails at write time.
"""

from __future__ import annotations

from enum import Enum

import pyarrow as pa


class RejectReason(str, Enum):
    """The fixed vocabulary of rejection reasons; `detail` carries the specifics."""

    READ_ERROR = "read_error"  # the file could not be read (permissions, vanished, S3 error)
    EMPTY_FILE = "empty_file"  # zero bytes
    TOO_LARGE_FILE = "too_large_file"  # more bytes than ingest.max_bytes
    NOT_AN_IMAGE = "not_an_image"  # no image format recognises the bytes
    UNSUPPORTED_FORMAT = "unsupported_format"  # an image, but not in ingest.formats
    TOO_MANY_PIXELS = "too_many_pixels"  # header claims more than ingest.max_pixels
    TOO_SMALL = "too_small"  # shorter oriented side below ingest.min_side
    TRUNCATED = "truncated"  # the pixel data ends early
    DECODE_ERROR = "decode_error"  # any other failure while decoding
    DUPLICATE_EXACT = "duplicate_exact"  # same SHA-256 as a kept image
    DUPLICATE_NEAR = "duplicate_near"  # a near duplicate of a larger image of this run
    DUPLICATE_PUBLISHED = "duplicate_published"  # already in an earlier version of the dataset (its hash index)
    # Web sources (URL lists, crawls): why a URL gave no image bytes.
    HTTP_STATUS = "http_status"  # a final 4xx/5xx answer (detail: the code)
    TIMEOUT = "timeout"  # connect or whole-body deadline passed on every attempt
    CONNECTION_ERROR = "connection_error"  # refused, reset, DNS failure on every attempt
    OPTED_OUT = "opted_out"  # X-Robots-Tag: noai / noimageai
    REDIRECTS = "redirects"  # a redirect loop, or more hops than fetch.max_redirects
    BLOCKED_ADDRESS = "blocked_address"  # a private, loopback or link-local target (fetch.allow_private is off)
    BAD_URL = "bad_url"  # not http(s), or no host
    ROBOTS = "robots"  # the site's robots.txt disallows it for our user agent
    # Content: decodable, but nothing a trainer can learn from.
    BLANK = "blank"  # near-uniform after flattening alpha (measured on the ingest thumbnail)
    # The shard stage: a sample PS3's loader cannot train on (shards.keep_empty writes them anyway).
    NO_BOXES = "no_boxes"  # no box with a non-empty caption survived (regions found none, or every caption was rejected)
    NO_GLOBAL_CAPTION = "no_global_caption"  # captioning is on but the image's global caption was rejected or failed


class NoBoxReason(str, Enum):
    """Why an image (still a sample) got zero boxes from the regions stage."""

    TOO_SMALL = "too_small"  # boxes would be below regions.min_box_side, or no tile fits
    TOO_PLAIN = "too_plain"  # no candidate box scores regions.min_score
    NO_TEXT = "no_text"  # the OCR detector found no text line
    ERROR = "error"  # the proposer failed on this image; `detail` has the exception


GLOBAL_REGION = -1  # captions-table region_id of an image's global caption


class CaptionStatus(str, Enum):
    """The `status` of a captions-table row: ok, or why the caption was rejected."""

    OK = "ok"
    EMPTY = "empty"  # nothing (left) after clean-up
    TOO_SHORT = "too_short"  # fewer words than a caption needs
    ERROR_SENTINEL = "error_sentinel"  # "ERROR", "N/A", "null", ... instead of a caption
    REFUSAL = "refusal"  # "I'm sorry, I cannot ..."
    DEGENERATE = "degenerate"  # looping or repetitive output
    TOKEN_DEBRIS = "token_debris"  # special tokens in the text ("<unk>", "<|im_end|>"): a detokenizer or template fault
    PROMPT_FRAMING = "prompt_framing"  # about the prompt's pictures ("the first image", "the crop"), not the picture
    BACKEND_ERROR = "backend_error"  # the back end failed on it after every retry; a rerun tries again


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


IMAGES = pa.schema(
    [
        _field("uid", pa.string(), "hex of the first 128 bits of sha256 of the original bytes"),
        _field("sha256", pa.string(), "hex sha256 of the original bytes"),
        _field("source_uri", pa.string(), "where the original bytes came from"),
        _field("width", pa.int32(), "width after EXIF orientation"),
        _field("height", pa.int32(), "height after EXIF orientation"),
        _field("format", pa.string(), "format of the stored `image` bytes: JPEG, PNG or WEBP"),
        _field("n_bytes", pa.int64(), "size of the original bytes"),
        _field("image", pa.large_binary(), "stored bytes: the original, or a normalised encoding (see meta)"),
        _field("phash", pa.uint64(), "64-bit perceptual hash (DCT)"),
        _field("dhash", pa.uint64(), "64-bit difference hash"),
        _field("fine_sig", pa.binary(256), "16 x 16 normalised block means (int8, 1/16 std steps): confirms near duplicates"),
        _field("struct_hash", pa.uint64(), "64-bit structure hash (colour high-pass magnitude): theme-variant candidates"),
        _field("struct_sig", pa.binary(256), "16 x 16 normalised structure blocks (int8): confirms theme variants"),
        _field("crop_hashes", pa.list_(pa.uint64()), "pHashes of keypoint windows: crop candidates"),
        _field("crop_points", pa.list_(pa.float32()), "x, y (fractions of width, height), sigma (fraction of the longer side) per window"),
        _field("thumb", pa.binary(), "JPEG of the stored picture, long side <= ingest.thumb_side: what the region proposer segments"),
        _field("meta", pa.string(), "JSON: exif subset, normalisation, source format, page URL, ..."),
    ]
)

REJECTS = pa.schema(
    [
        _field("source_uri", pa.string(), "the rejected input"),
        _field("uid", pa.string(), "uid when the bytes could be hashed", nullable=True),
        _field("stage", pa.string(), "stage that rejected it"),
        _field("reason", pa.string(), "one of RejectReason"),
        _field("detail", pa.string(), "human-readable specifics"),
        _field("retryable", pa.bool_(), "the failure may be temporary (timeout, connection, HTTP 429/5xx): a rerun tries it again"),
    ]
)


def reject(source_uri: str, uid: str | None, stage: str, reason: RejectReason, detail: str, retryable: bool = False) -> dict:
    """One rejects-table row."""
    return {"source_uri": source_uri, "uid": uid, "stage": stage, "reason": reason.value, "detail": detail, "retryable": retryable}


URLS = pa.schema(
    [
        _field("url", pa.string(), "image URL to fetch (or, for a row without one, where it was listed)"),
        _field("meta", pa.string(), "JSON carried into the image's meta: caption/alt, license, page URL, ..."),
        _field("skip_reason", pa.string(), "a RejectReason decided before fetching (robots, bad_url, opted_out)", nullable=True),
        _field("skip_detail", pa.string(), "specifics of skip_reason", nullable=True),
    ]
)

REGIONS = pa.schema(
    [
        _field("uid", pa.string(), "image uid"),
        _field("region_id", pa.int32(), "0-based index of the box within its image"),
        _field("box", pa.list_(pa.int32(), 4), "[x1, y1, x2, y2] in oriented original pixels"),
        _field("score", pa.float32(), "proposer score"),
        _field("method", pa.string(), "proposer name"),
    ]
)

REGION_STATUS = pa.schema(
    [
        _field("uid", pa.string(), "image uid"),
        _field("method", pa.string(), "proposer name"),
        _field("boxes", pa.int32(), "boxes kept for the image"),
        _field("reason", pa.string(), "one of NoBoxReason when boxes = 0", nullable=True),
        _field("detail", pa.string(), "human-readable specifics", nullable=True),
        _field("decode_ms", pa.float32(), "time decoding the downscaled copy"),
        _field("segment_ms", pa.float32(), "time computing masks (or text lines)"),
        _field("score_ms", pa.float32(), "time scoring and selecting boxes"),
    ]
)

CAPTIONS = pa.schema(
    [
        _field("uid", pa.string(), "image uid"),
        _field("region_id", pa.int32(), "box index, -1 for the global caption"),
        _field("text", pa.string(), "cleaned caption", nullable=True),
        _field("box", pa.list_(pa.int32(), 4), "the captioned box (null for the global caption)", nullable=True),
        _field("model", pa.string(), "model that wrote it: id or path, and @revision when known"),
        _field("backend", pa.string(), "transformers, vllm or openai"),
        _field("prompt_id", pa.string(), "versioned prompt name"),
        _field("prompt_tokens", pa.int32(), "prompt tokens, images included (0 when the back end does not say)"),
        _field("n_tokens", pa.int32(), "generated tokens"),
        _field("status", pa.string(), "one of CaptionStatus: ok, or why it was rejected"),
        _field("detail", pa.string(), "raw output of a rejected caption, or the back end's error", nullable=True),
    ]
)

DEDUPE = pa.schema(
    [
        _field("uid", pa.string(), "image uid"),
        _field("cluster", pa.string(), "uid of the cluster's kept image"),
        _field("kept", pa.bool_(), "whether this image goes to the shards"),
        _field("duplicate_of", pa.string(), "uid it duplicates", nullable=True),
        _field("match", pa.string(), "how it matched: exact (same bytes), edit (re-encode, resize), theme (light/dark, palette) or crop",
               nullable=True),
    ]
)

MANIFEST = pa.schema(
    [
        _field("key", pa.string(), "sample key inside the tars"),
        _field("uid", pa.string(), "image uid"),
        _field("shard", pa.string(), "the image (or combined) tar, relative to the dataset, e.g. image/image_000000.tar"),
        _field("source", pa.string(), "source URI of the original"),
        _field("width", pa.int32(), "oriented width"),
        _field("height", pa.int32(), "oriented height"),
        _field("boxes", pa.int32(), "number of boxes in the sample"),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "images": IMAGES,
    "rejects": REJECTS,
    "urls": URLS,
    "regions": REGIONS,
    "region_status": REGION_STATUS,
    "captions": CAPTIONS,
    "dedupe": DEDUPE,
    "manifest": MANIFEST,
}


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table from row dicts, checked against the schema (missing or mistyped columns fail)."""
    return pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
