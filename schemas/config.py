"""The run config: one YAML file, validated before any work starts.

Every section forbids unknown keys, so a typo fails with the field's dotted path instead of being
silently ignored. `RunConfig` holds one section per concern (run, sources, ingest, fetch, regions,
captioner, dedupe, shards, publish, deploy, storage, ray, prefect, train); each field's
description is its documentation.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from schemas.base import Section as _Section
from schemas.train import TrainConfig


class RunSection(_Section):
    name: str = Field("localcap", description="Dataset name, recorded in dataset.json.")
    work_dir: str = Field(
        "./localcap-work",
        description="Where runs keep their stage tables: WORK/RUN_ID/STAGE/part-NNNNN.parquet (path or s3://).",
    )


class FilesSource(_Section):
    """Image files under a local folder, a local glob, an s3:// prefix or an s3:// glob."""

    type: Literal["files"] = "files"
    uri: str = Field(..., min_length=1, description="Folder, glob (`*`, `**`) or s3://bucket/prefix.")
    extensions: list[str] | None = Field(
        None,
        description="Only list files with these extensions (case-insensitive, e.g. ['.jpg']); "
        "default: every file, so that non-images are recorded as rejects rather than skipped.",
    )


class UrlListSource(_Section):
    """Image URLs listed in files: parquet, csv, tsv, jsonl or txt (one URL per line), optionally .gz.

    The list is read as a stream (it may hold 100M rows). Optional columns (caption, alt, alt_text,
    text, license, page_url, width, height) are carried into each image's `meta`.
    """

    type: Literal["urls"]
    uri: str = Field(..., min_length=1, description="A list file, a folder or glob of them, or s3:// (same rules as `files`).")
    url_column: str | None = Field(None, description="Column holding the URL (default: the first of url, image_url, URL, src).")


class CrawlSource(_Section):
    """Pages crawled from start URLs, following same-site links; images from <img src/srcset>,
    <picture><source srcset> and og:image (the largest candidate of each srcset)."""

    type: Literal["crawl"]
    start_urls: list[str] = Field(..., min_length=1, description="Where the crawl starts (depth 0).")
    max_depth: int = Field(2, ge=0, description="Links followed from a start page: 0 = the start pages only.")
    max_pages: int = Field(1000, ge=1, description="Stop fetching pages after this many (images found so far are kept).")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts whose pages are followed besides the start URLs' own hosts (images may live anywhere)."
    )
    robots: bool = Field(True, description="Honour each host's robots.txt for pages and images.")


SOURCE_TAGS = ("files", "urls", "crawl")


def _source_type(value) -> str:
    return (value.get("type") if isinstance(value, dict) else getattr(value, "type", None)) or "files"


# `type` picks the model (and only that model's errors are reported); without one, a source is `files`.
Source = Annotated[
    Annotated[FilesSource, Tag("files")] | Annotated[UrlListSource, Tag("urls")] | Annotated[CrawlSource, Tag("crawl")],
    Discriminator(_source_type),
]


class IngestSection(_Section):
    min_side: int = Field(1024, ge=1, description="Reject images whose shorter (oriented) side is below this.")
    max_pixels: int = Field(
        100_000_000, ge=1, description="Reject images whose header claims more pixels (decompression-bomb guard)."
    )
    max_bytes: int = Field(200 * 2**20, ge=1, description="Reject files larger than this many bytes without reading them.")
    formats: list[Literal["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "MPO"]] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "MPO"],
        description="Decoded formats that are accepted (PIL format names).",
    )
    partition_size: int = Field(32, ge=1, description="Images per ingest partition (one Ray task, one Parquet file).")
    reencode_quality: int = Field(95, ge=50, le=100, description="JPEG quality when bytes must be normalised.")
    crop_hashes: bool = Field(
        True,
        description="Store window hashes around keypoints of each thumbnail, so dedupe finds crops of an image (down to a "
        "third of its area). Costs about 20 ms of CPU per image; off, crops are kept as separate samples.",
    )
    thumb_side: int = Field(
        384, ge=64, le=2048,
        description="Long side of the thumbnail ingest keeps of each image (the images table's `thumb`): hashes and "
        "the region proposer work from it, so the full image is decoded once, in ingest.",
    )


class FetchSection(_Section):
    """How URL lists and crawls are fetched: polite per host, bounded overall, never hanging."""

    concurrency: int = Field(64, ge=1, description="Requests in flight per ingest worker (a worker's resources, not politeness).")
    per_host_concurrency: int = Field(
        8, ge=1, description="Requests in flight to one host from the whole run (shared out between the ingest workers).")
    per_host_rate: float = Field(
        10.0, gt=0,
        description="Request starts per second to one host from the whole run, retries included: each of the W "
        "ingest workers running at once spaces its starts by W / rate.",
    )
    retries: int = Field(3, ge=0, description="Retries on connection errors, timeouts, HTTP 429 and 5xx.")
    backoff_s: float = Field(0.5, ge=0, description="First backoff; doubles each retry, with full jitter; Retry-After wins.")
    max_backoff_s: float = Field(30.0, ge=0, description="Longest single wait between attempts (Retry-After included).")
    connect_timeout_s: float = Field(10.0, gt=0, description="Per attempt, to open the connection.")
    timeout_s: float = Field(60.0, gt=0, description="Per attempt, for the whole response, body included.")
    max_redirects: int = Field(5, ge=0, description="Redirect hops followed; loops are detected.")
    allow_private: bool = Field(
        False,
        description="Allow every non-global address (private 10/8, 172.16/12, 192.168/16, fc00::/7, carrier-grade NAT "
        "100.64/10, the other special-purpose ranges), loopback included: intranets. Link-local (169.254/16, the cloud "
        "metadata service, fe80::/10), multicast and unspecified addresses are refused always.",
    )
    allow_loopback: bool = Field(
        False, description="Allow loopback addresses only (127/8, ::1): local test servers, without opening the rest.")
    max_bytes_in_flight: int = Field(
        512 * 2**20, ge=2**20,
        description="Per ingest worker, body bytes read or waiting to be decoded at once: a body's Content-Length "
        "(else ingest.max_bytes) is reserved before it is read. A body larger than this is read alone.",
    )
    honour_opt_out: bool = Field(True, description="Reject images served with X-Robots-Tag: noai or noimageai.")
    user_agent: str = Field("localcap/0.1 (+https://github.com/localcap/localcap)", description="Sent with every request; robots.txt rules are matched against it.")
    partition_size: int = Field(
        32, ge=1,
        description="URLs per ingest partition (one Ray task, one Parquet file, held in memory: 32 4K photos are ~65 MB). "
        "Smaller partitions overlap fetching with writing better (benchmarks/fetch.py); raise it for lists of 100M+ URLs.",
    )

    def per_worker(self, workers: int) -> FetchSection:
        """The share of one of `workers` ingest workers running at once: per-host limits divided."""
        return self.model_copy(update={"per_host_rate": self.per_host_rate / workers,
                                       "per_host_concurrency": max(1, self.per_host_concurrency // workers)})


class FelzenszwalbOptions(_Section):
    """scikit-image's graph segmentation, run on the downscaled copy (defaults tuned on the test scenes:
    a small scale and min_size keep the many small segments that mark detail)."""

    scale: float = Field(20.0, gt=0, description="Higher means larger segments.")
    sigma: float = Field(1.0, ge=0, description="Gaussian pre-smoothing (pixels of the downscaled copy).")
    min_size: int = Field(5, ge=1, description="Segments smaller than this many pixels are merged into a neighbour.")


class DistinctLevel(_Section):
    """One felzenszwalb segmentation of the copy, for the 'distinct' score."""

    scale: float = Field(..., gt=0, description="felzenszwalb scale: higher means larger segments.")
    min_size: int = Field(..., ge=1, description="Smallest segment, in pixels of the copy.")
    weight: float = Field(1.0, gt=0, description="Multiplies this level's segment weights.")
    detail: bool = Field(False, description="A segment in a patch much busier than the picture on average counts as distinct too.")
    small_area: float = Field(
        ..., gt=0, le=1,
        description="Segments larger than this fraction of the picture weigh less in proportion (PS3's preference for small masks).",
    )


class DistinctOptions(_Section):
    """The 'distinct' score of salient boxes (pipeline/regions/distinct.py): segments weighed by how much
    they stand out. Tuned on the real-picture set (benchmarks/regions_real.py) and the generated scenes."""

    levels: list[DistinctLevel] = Field(
        default_factory=lambda: [DistinctLevel(scale=300, min_size=20, weight=2.0, small_area=0.01),
                                 DistinctLevel(scale=20, min_size=5, weight=0.5, small_area=0.005, detail=True)],
        min_length=1,
        description="Segmentations whose segments are pooled: a coarse one (objects) and a fine one (small details).",
    )
    box_scales: list[float] = Field(
        default_factory=lambda: [0.1, 0.15, 0.2, 0.3, 0.45, 0.6], min_length=1,
        description="Box sides as fractions of the short side; each candidate takes the smallest that frames its segment.",
    )
    scales_per_segment: int = Field(2, ge=1, description="Candidates per segment: the smallest framing scale and the next ones up.")
    margin: float = Field(1.25, ge=1, description="A box frames a segment when its side is at least this times the segment's long side.")
    candidates: int = Field(60, ge=1, description="Heaviest segments that candidates are centred on.")
    size_penalty: float = Field(
        0.25, ge=0,
        description="A candidate's score is multiplied by (smallest candidate side / its side) ** this: of two boxes "
        "around the same object the tighter one wins unless the larger holds clearly more.")
    coherence_sigma: float = Field(2.0, gt=0, description="Window (Gaussian sigma, pixels of the copy) of the edge-coherence measure.")
    coherence_power: float = Field(
        0.5, ge=0, description="Segments weigh (1 - coherence) ** this: edges running one way (between flat regions) weigh little.")
    detail_window: float = Field(0.05, gt=0, le=1, description="Side of the window local busyness is measured in, as a fraction of the short side.")
    detail_floor: float = Field(0.01, gt=0, description="Busyness (segments per pixel of the copy) below which a picture counts as calm.")
    detail_lift_ref: float = Field(6.0, gt=0, description="A patch this many times busier than average (minus 1) counts fully.")
    max_segment_fraction: float = Field(0.15, gt=0, le=1, description="Segments larger than this fraction of the picture (background) weigh nothing.")
    contrast_ref: float = Field(20.0, gt=0, description="Local contrast (Lab distance to the surrounding ring) at which a segment counts fully.")
    min_thickness: float = Field(3.0, gt=0, description="Segments thinner than this (pixels of the copy; edge blends) weigh less in proportion.")
    colour_bins: int = Field(16, ge=4, le=64, description="Bins per Lab axis of the colour histogram that ownership is measured on.")
    colour_smoothing: float = Field(1.0, ge=0, description="Gaussian smoothing of that histogram, in bins.")
    min_score: float = Field(
        0.4, ge=0,
        description="Boxes holding less weight are not kept (a segment that owns its colour, stands out and is small weighs 1). "
        "An image with no box above it gets zero boxes, reason 'too_plain'.",
    )


class SamOptions(_Section):
    """transformers' SAM automatic mask generation, in a GPU Ray actor."""

    model: str = Field("facebook/sam-vit-base", description="Local directory or Hugging Face id (must be in the local cache: nothing is downloaded).")
    downscale: int = Field(1024, ge=64, description="Long side of the copy SAM segments (SAM's own input size is 1024).")
    points_per_batch: int = Field(64, ge=1, description="Prompt points per forward pass.")
    points_per_crop: int = Field(32, ge=2, description="Grid of prompt points per side.")
    pred_iou_thresh: float = Field(0.88, ge=0, le=1, description="Drop masks the model itself rates below this.")
    stability_score_thresh: float = Field(0.95, ge=0, le=1, description="Drop masks that change under small threshold shifts.")
    device: Literal["cuda", "cpu"] = Field("cuda", description="'cpu' only for tests and tiny models: SAM is far too slow there.")
    num_gpus: float = Field(1.0, ge=0, description="GPUs each SAM actor asks Ray for.")
    actors: int | None = Field(None, ge=1, description="SAM actors (default: one per GPU in the cluster).")


class TilesOptions(_Section):
    tile: int = Field(512, ge=16, description="Tile side at scale 1, in pixels of the scaled image.")
    scales: list[float] = Field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25], min_length=1,
                                description="Pyramid scales: at scale s the tiles are tile/s original pixels wide.")


class OcrOptions(_Section):
    max_side: int = Field(1280, ge=64, description="Long side the page is downscaled to for text detection.")
    min_height: int = Field(8, ge=1, description="Drop detected lines lower than this many original pixels.")


class RegionsSection(_Section):
    method: Literal["salient", "tiles", "ocr", "none"] = Field(
        "salient",
        description="'salient': PS3's top-k non-overlapping boxes holding the most small masks; 'tiles': a pyramid "
        "of tiles; 'ocr': text-line boxes (document pages, needs the `ocr` extra); 'none': no boxes.",
    )
    masks: Literal["felzenszwalb", "sam"] = Field("felzenszwalb", description="Mask back end of 'salient'.")
    scoring: Literal["distinct", "learned", "ps3"] = Field(
        "distinct",
        description="How 'salient' scores boxes with felzenszwalb masks: 'learned' judges each of distinct's candidate boxes "
        "with two small tree models (pipeline/regions/box_scorer.json: does it hold a detail, how many) and keeps the best; "
        "'distinct' (the default) weighs segments by how much they stand out (regions.distinct), frames them at a few scales and picks "
        "boxes greedily down to regions.distinct.min_score; 'ps3' is PS3's original grid of boxes holding the most small "
        "masks (grid_fraction, stride_fraction, mask_floor, min_score). SAM masks always use 'ps3'.",
    )
    k: int = Field(4, ge=1, description="Boxes kept per image ('salient'; 'tiles' and 'ocr' keep all).")
    grid_fraction: float = Field(0.2, gt=0, le=1, description="Candidate box side as a fraction of the short side (PS3: 1/5).")
    stride_fraction: float = Field(0.5, gt=0, le=1, description="Grid stride as a fraction of the box side.")
    downscale: int = Field(256, ge=32, description="Long side (pixels) of the copy that is segmented (from ingest's thumbnail when it is no larger than ingest.thumb_side).")
    mask_floor: int = Field(40, ge=1, description="Masks count as at least this side squared (original pixels) in the score.")
    min_mask_pixels: int = Field(1, ge=1, description="Masks with fewer pixels on the downscaled copy are ignored.")
    min_score: float = Field(
        10.0, ge=0,
        description="Boxes scoring below this are not kept; a box holding a whole mask of 1/N of the image scores N. "
        "An image with no box above it gets zero boxes, reason 'too_plain'.",
    )
    min_box_side: int = Field(32, ge=1, description="Images whose boxes would be narrower than this get zero boxes ('too_small').")
    felzenszwalb: FelzenszwalbOptions = Field(default_factory=FelzenszwalbOptions)
    distinct: DistinctOptions = Field(default_factory=DistinctOptions)
    sam: SamOptions = Field(default_factory=SamOptions)
    tiles: TilesOptions = Field(default_factory=TilesOptions)
    ocr: OcrOptions = Field(default_factory=OcrOptions)


class VllmOptions(_Section):
    """vLLM's offline engine, one per Ray actor. Engine arguments pass through to `vllm.LLM`."""

    dtype: str = Field("auto", description="Weights/activations dtype: auto, bfloat16, float16, float32.")
    quantization: str | None = Field(None, description="e.g. fp8, awq, gptq (as vLLM names them).")
    max_model_len: int | None = Field(4096, ge=64, description="Context length; two images + prompt + caption must fit.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (= per actor).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may take.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences the engine runs at once.")
    enforce_eager: bool = Field(False, description="Skip CUDA graph capture (faster start, slower steps).")
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=lambda: {"image": 2, "video": 0})
    engine_args: dict = Field(default_factory=dict, description="Any other vllm.LLM keyword argument.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment of the engine's actor (e.g. VLLM_CPU_KVCACHE_SPACE).")


class OpenAIOptions(_Section):
    """Any OpenAI-compatible chat endpoint (`vllm serve`, Ray Serve, a hosted API)."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="Endpoint root, up to /v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the key (never written to records).")
    concurrency: int = Field(16, ge=1, description="Requests in flight per worker.")
    timeout_s: float = Field(120.0, gt=0, description="Per request.")
    max_retries: int = Field(4, ge=0, description="Retries on connection errors, timeouts, 429 and 5xx, with exponential backoff.")
    backoff_s: float = Field(1.0, ge=0, description="First backoff; doubles each retry, with jitter; Retry-After wins when given.")
    image_format: Literal["jpeg", "png"] = Field("jpeg", description="How images travel in data URLs: jpeg (small) or png (lossless).")


class CaptionerSection(_Section):
    backend: Literal["none", "transformers", "vllm", "openai"] = Field(
        "none",
        description="'vllm': vLLM engines in Ray actors (GPUs, or vllm-cpu); 'openai': an OpenAI-compatible server; "
        "'transformers': Hugging Face generate (CPU, small jobs); 'none': no captions (texts stay empty).",
    )
    model: str | None = Field(None, description="Local directory or Hugging Face id in the local cache; for 'openai' the served model name.")
    revision: str | None = Field(None, description="Model revision, recorded with every caption.")
    prompt_id: str = Field("ps3-v1", description="Versioned prompt set (captioners/prompts.py), recorded with every caption.")
    local_prompt: str | None = Field(None, description="Override of the box prompt (needs a new prompt_id).")
    global_prompt: str | None = Field(None, description="Override of the global prompt (needs a new prompt_id).")
    global_caption: bool = Field(True, description="Also write a global caption per image.")
    max_pixels: int = Field(256 * 28 * 28, ge=28 * 28, description="Pixel budget of each image shown to the model (whole view, crop).")
    max_new_tokens: int = Field(96, ge=1, description="Generated tokens per caption.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, description="Sampling seed.")
    batch_size: int = Field(64, ge=1, description="Requests per back-end call.")
    device: Literal["cuda", "cpu"] = Field("cuda", description="Where transformers/vLLM run; 'cpu' for vllm-cpu and small jobs.")
    num_gpus: float = Field(1.0, ge=0, description="GPUs each captioning actor asks Ray for (device cuda).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type the actors need, e.g. H100 or A100.")
    actors: int | None = Field(None, ge=1, description="Captioning actors (default: one per GPU; 1 on CPU).")
    vllm: VllmOptions = Field(default_factory=VllmOptions)
    openai: OpenAIOptions = Field(default_factory=OpenAIOptions)

    @property
    def model_ref(self) -> str:
        """The model as recorded with every caption: id or path, and @revision when one is given."""
        return (self.model or "") + (f"@{self.revision}" if self.revision else "")

    @model_validator(mode="after")
    def _model_given(self) -> "CaptionerSection":
        if self.backend != "none" and not self.model:
            raise ValueError(f"captioner.model is required for backend {self.backend!r}")
        return self


class DedupeSection(_Section):
    exact: bool = Field(True, description="Drop byte-identical images (same SHA-256); the first by source URI is kept.")
    near: bool = Field(True, description="Drop near duplicates (re-encodes, resizes, format changes, brightness, light/dark and "
                      "colour-theme variants, crops down to about a third of the area).")
    radius: int = Field(4, ge=0, le=15, description="pHash Hamming radius for near-duplicate candidates.")
    fine_threshold: float = Field(
        0.8, gt=0,
        description="Candidates are confirmed only if no 16x16 block of their normalised thumbnails differs by more "
        "than this many standard deviations (images that differ in a small detail are different samples).",
    )
    index: str | None = Field(
        None,
        description="A published dataset name (as publish.to) whose images a build skips: those its newest version "
        "holds and those removed with --block. Default (None): publish.to, the dataset this build becomes a version of.",
    )
    distributed_min: int = Field(
        200_000, ge=0,
        description="With at least this many hashes (run + index), the search runs as Ray tasks split by band set; below, in-process.",
    )
    box_iou: float = Field(0.7, gt=0, le=1, description="Within an image, drop a box overlapping a kept one by more IoU than this.")
    caption_similarity: float = Field(
        0.9, gt=0, le=1, description="Within an image, drop a box whose caption's word-set overlap (Jaccard) with a kept box's is at least this."
    )


class ShardsSection(_Section):
    output: str = Field(..., min_length=1, description="Dataset directory (path or s3://) the shards are written to.")
    layout: Literal["paired", "combined"] = Field(
        "paired", description="'paired': PS3's image/ + text_box/ tars; 'combined': one tar with KEY.jpg + KEY.json."
    )
    max_samples: int = Field(1000, ge=1, description="Start a new shard after this many samples.")
    max_bytes: int = Field(1 << 30, ge=1, description="Start a new shard before a tar would pass this many bytes.")
    sample_type: Literal["natural", "document"] = Field("natural", description="`type` written to each sample's JSON.")
    keep_empty: bool = Field(
        False,
        description="Also write images PS3's loader cannot train on: no box with a caption, or (captioning on) no global "
        "caption. Off: such images are rejects (no_boxes, no_global_caption), so inputs = samples + rejected still holds.",
    )


class PublishSection(_Section):
    """Release the built dataset (shards.output, the staging folder) as NAME/vN (see pipeline/versions.py)."""

    to: str | None = Field(
        None, description="Dataset name to publish to, e.g. s3://bucket/datasets/NAME (or a local folder); "
        "each build becomes the next version NAME/vN and NAME/LATEST moves to it. None: build only.")
    concurrency: int = Field(8, ge=1, description="Files uploaded at once (and parts of one big file).")
    part_size_mb: int = Field(64, ge=5, description="Multipart upload part size (S3's minimum is 5 MB).")
    report_link_hours: float = Field(
        168, gt=0, le=168, description="How long the presigned https link to an S3 version's report (NAME/vN/report.html, "
        "in the build's Prefect artifact) stays valid; S3 allows at most 7 days, and temporary credentials end it sooner.")


class DeploySection(_Section):
    """How `localcap deploy` registers this config as Prefect deployments (build_dataset, end_to_end, train)."""

    cron: str | None = Field(None, description="Schedule, e.g. '0 3 * * *' (None: run only when triggered).")
    interval_s: float | None = Field(None, gt=0, description="Or a fixed interval between scheduled runs, in seconds (not with cron).")
    flow: Literal["build_dataset", "end_to_end", "train"] = Field(
        "build_dataset", description="Which deployment the cron schedule runs (the others run when triggered).")
    timezone: str = Field("UTC", description="Time zone of the cron schedule.")
    work_pool: str = Field("localcap", description="Prefect work pool whose workers run it (created as a process pool if missing).")
    concurrency: int = Field(1, ge=1, description="Runs of this dataset's build at once; later ones wait (two scheduled builds never overlap).")
    retrain: Literal["none", "on_publish"] = Field(
        "none", description="on_publish: every new version of publish.to (its localcap.dataset.published event) starts the "
        "train deployment on exactly that version, NAME/vN.")
    retrain_when_busy: Literal["queue", "skip"] = Field(
        "queue", description="One training run of this dataset at a time: a version published while one trains waits for "
        "it (queue) or is not trained on (skip).")

    @model_validator(mode="after")
    def _one_schedule(self) -> "DeploySection":
        if self.cron and self.interval_s:
            raise ValueError("give deploy.cron or deploy.interval_s, not both")
        return self

    @property
    def scheduled(self) -> bool:
        return bool(self.cron or self.interval_s)


class StorageSection(_Section):
    endpoint_url: str | None = Field(
        None, description="S3 endpoint (e.g. http://127.0.0.1:9000); default: AWS_ENDPOINT_URL or AWS."
    )
    region: str | None = Field(None, description="S3 region; default: AWS_DEFAULT_REGION or us-east-1.")


class RaySection(_Section):
    address: str | None = Field(None, description="Ray cluster address; default: RAY_ADDRESS, else a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all).")
    cpu_stage_resource: str | None = Field(
        "cpu_worker",
        description="When the cluster advertises this custom resource (infra/ray: the CPU worker nodes), the CPU "
        "stages' tasks ask for a sliver of it, so they never land on GPU nodes; null lets them run anywhere.",
    )


class PrefectSection(_Section):
    retries: int = Field(2, ge=0, description="Retries of each stage task.")
    retry_delay_s: float = Field(5.0, ge=0, description="Seconds between retries.")


STAGE_SECTIONS: dict[str, type[_Section]] = {}  # added stages' own sections, by stage name (pipeline/stage.py fills it)


def load_stage_plugins() -> None:
    """Import the stages of installed plugins (entry points `localcap.stages`): they declare sections."""
    from importlib import metadata

    for entry in metadata.entry_points(group="localcap.stages"):
        entry.load()


class RunConfig(_Section):
    model_config = ConfigDict(extra="allow", frozen=True)  # extra: only added stages' sections (_stage_sections)

    run: RunSection = Field(default_factory=RunSection)
    sources: list[Source] = Field(..., min_length=1)
    ingest: IngestSection = Field(default_factory=IngestSection)
    fetch: FetchSection = Field(default_factory=FetchSection)
    regions: RegionsSection = Field(default_factory=RegionsSection)
    captioner: CaptionerSection = Field(default_factory=CaptionerSection)
    dedupe: DedupeSection = Field(default_factory=DedupeSection)
    shards: ShardsSection
    publish: PublishSection = Field(default_factory=PublishSection)
    deploy: DeploySection = Field(default_factory=DeploySection)
    storage: StorageSection = Field(default_factory=StorageSection)
    ray: RaySection = Field(default_factory=RaySection)
    prefect: PrefectSection = Field(default_factory=PrefectSection)
    train: TrainConfig = Field(default_factory=TrainConfig, description="What `localcap run --train` trains on the built version.")
    _checked: dict = PrivateAttr(default_factory=dict)  # preflights passed (pipeline.preflight.check_run)
    _origin: dict | None = PrivateAttr(default=None)  # where load_config read it: path, overrides, paths_from

    @model_validator(mode="before")
    @classmethod
    def _stage_sections(cls, data):
        """Top-level keys beyond the built-in sections must be the section of an added stage (a
        `Stage` with `section = ...`, pipeline/stage.py); each is validated by the stage's model."""
        if not isinstance(data, dict):
            return data
        extra = [k for k in data if k not in cls.model_fields]
        if any(k not in STAGE_SECTIONS for k in extra):
            load_stage_plugins()
        out, errors = dict(data), []
        for key in extra:
            model = STAGE_SECTIONS.get(key)
            if model is None:
                errors.append({"type": PydanticCustomError("unknown_section", "{msg}", {"msg": (
                    f"unknown section: not a built-in section and no stage declares it "
                    f"(stages with their own section: {', '.join(sorted(STAGE_SECTIONS)) or 'none'})")}), "loc": (key,), "input": data[key]})
            elif not isinstance(data[key], model):
                try:
                    out[key] = model.model_validate(data[key] if data[key] is not None else {})
                except ValidationError as err:  # its errors, under the section's name
                    errors.extend({"type": e["type"], "loc": (key, *e["loc"]), "input": e["input"], **({"ctx": e["ctx"]} if "ctx" in e else {})}
                                  for e in err.errors())
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return out

    def stage_section(self, name: str):
        """The section of an added stage (None: absent from this config)."""
        return (self.__pydantic_extra__ or {}).get(name)

    def _digest(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, default=str)

    def checked(self, train: bool = False) -> bool:
        """Whether check_run passed for this config as it is now (with the train output, for `train`)."""
        digest = self._digest()
        return self._checked.get(True) == digest or (not train and self._checked.get(False) == digest)

    @property
    def origin(self) -> dict | None:
        """{"path", "overrides", "paths_from"}: the YAML file, --set overrides and folder relative paths
        were taken against, when load_config made this config (a deployment passes these, not the config)."""
        return self._origin

    def mark_checked(self, train: bool) -> None:
        self._checked = {**self._checked, train: self._digest()}  # a new dict: copies of the model do not share it

    @model_validator(mode="after")
    def _output_outside_work(self) -> RunConfig:
        if self.shards.output.rstrip("/") == self.run.work_dir.rstrip("/"):
            raise ValueError("shards.output must differ from run.work_dir")
        if self.publish.to and self.shards.output.startswith("s3://"):
            raise ValueError("publish.to needs shards.output to be a local folder: it is the staging area the version is uploaded from")
        if self.regions.method == "none" and not self.shards.keep_empty:
            raise ValueError("regions.method 'none' proposes no boxes, so every image would be rejected as no_boxes: PS3's "
                             "loader cannot train on a sample without boxes. Set shards.keep_empty: true to write them anyway")
        return self


SECRET_KEY = re.compile(r"secret|passw(or)?d|token|api_?key|credential|access_?key|private_?key|auth", re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?<=://)([^/@:\s]+):[^/@\s]+@")


def redact_secrets(data):
    """A config dump safe to write into records and published files: values of keys that name a
    credential become "***" (not the *_env keys, which hold an environment variable's name), and
    passwords inside URLs (scheme://user:password@host) are cut."""
    if isinstance(data, dict):
        return {k: "***" if isinstance(k, str) and SECRET_KEY.search(k) and not k.endswith("_env") and v not in (None, "")
                else redact_secrets(v) for k, v in data.items()}
    if isinstance(data, list):
        return [redact_secrets(v) for v in data]
    if isinstance(data, str):
        return URL_PASSWORD.sub(r"\1:***@", data)
    return data


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_id(run_id: str) -> str:
    if not RUN_ID.fullmatch(run_id):
        raise ValueError(f"--run-id: run id {run_id!r} must be 1-100 letters, digits, '.', '_' or '-' (it names a folder)")
    return run_id


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending field."""


def _format_errors(err: ValidationError, origin: str) -> str:
    """One line for one mistake (`invalid config F: FIELD: what`); a line per field for several."""
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        loc = e["loc"]
        # Drop the union tag pydantic inserts after a list index (sources.0.crawl.start_urls -> sources.0.start_urls).
        loc = [p for i, p in enumerate(loc) if not (p in SOURCE_TAGS and i and isinstance(loc[i - 1], int))]
        path = ".".join(str(p) for p in loc) or "(top level)"
        lines.append(f"  {path}: {e['msg']}")
    return f"{lines[0]} {lines[1].strip()}" if len(lines) == 2 else "\n".join(lines)


def parse_config(data: dict, origin: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def parse_train_config(data: dict, origin: str = "<dict>") -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def read_yaml(path: str | Path, overrides: dict | None = None) -> dict:
    """A YAML mapping with dotted overrides applied (KEY.SUB=VALUE), errors as ConfigError."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return apply_overrides(data, overrides or {})


def apply_overrides(data: dict, overrides: dict) -> dict:
    """Set dotted keys in a config mapping (`ingest.min_side`, `sources.0.uri`: a number indexes a
    list), creating sections as needed. An index past a list's end, or a key into a value that is
    neither a mapping nor a list, is a ConfigError naming the key: appending is not an override."""
    for dotted, value in overrides.items():
        node, path, keys = data, [], dotted.split(".")
        if not all(keys):
            raise ConfigError(f"--set {dotted}: empty key")
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit():
                    raise ConfigError(f"--set {dotted}: {'.'.join(path) or 'the config'} is a list; index it with a number "
                                      f"(0 to {len(node) - 1}), not {key!r}")
                index = int(key)
                if index >= len(node):
                    raise ConfigError(f"--set {dotted}: {'.'.join(path)} has {len(node)} item(s) (0 to {len(node) - 1}); "
                                      "--set changes an item, it cannot add one: add it to the YAML file")
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[key] = value
                else:
                    node = node.setdefault(key, {})
            else:
                raise ConfigError(f"--set {dotted}: {'.'.join(path)} is a value ({node!r}), not a section or a list")
            path.append(key)
    return data


def absolute_path(value: str | None, base: str | Path) -> str | None:
    """A local path made absolute against `base` (the caller's working directory); s3:// and other
    URLs, and None, pass unchanged. Globs stay globs. Needed because Ray workers and Prefect
    deployments run in working directories of their own."""
    if value is None or "://" in value:
        return value
    return os.path.abspath(os.path.join(base, os.path.expanduser(value)))


def absolute_model_path(value: str | None, base: str | Path) -> str | None:
    """A model reference made absolute only when it is a local path (starts with '.', '/' or '~', or
    names an existing folder under `base`); a Hugging Face id such as Qwen/Qwen2-VL-2B-Instruct stays."""
    if value is None or "://" in value:
        return value
    if value.startswith((".", "/", "~")) or (Path(base) / value).exists():
        return absolute_path(value, base)
    return value


def train_with_absolute_paths(cfg: TrainConfig, base: str | Path) -> TrainConfig:
    model = cfg.model.model_copy(update={"pretrained": absolute_model_path(cfg.model.pretrained, base)})
    return cfg.model_copy(update={"output": absolute_path(cfg.output, base), "tokenizer": absolute_model_path(cfg.tokenizer, base),
                                  "model": model})


def with_absolute_paths(cfg: RunConfig, base: str | Path) -> RunConfig:
    """Every local path of a run config made absolute against `base`, once, when the config is loaded."""
    def sub(section, **fields):
        return section.model_copy(update=fields)

    sources = [sub(s, uri=absolute_path(s.uri, base)) if isinstance(s, (FilesSource, UrlListSource)) else s for s in cfg.sources]
    regions = sub(cfg.regions, sam=sub(cfg.regions.sam, model=absolute_model_path(cfg.regions.sam.model, base)))
    return cfg.model_copy(update={
        "run": sub(cfg.run, work_dir=absolute_path(cfg.run.work_dir, base)),
        "sources": sources,
        "regions": regions,
        "captioner": sub(cfg.captioner, model=absolute_model_path(cfg.captioner.model, base)) if cfg.captioner.backend != "openai" else cfg.captioner,
        "dedupe": sub(cfg.dedupe, index=absolute_path(cfg.dedupe.index, base)),
        "shards": sub(cfg.shards, output=absolute_path(cfg.shards.output, base)),
        "publish": sub(cfg.publish, to=absolute_path(cfg.publish.to, base)),
        "train": train_with_absolute_paths(cfg.train, base),
    })


def load_config(path: str | Path, overrides: dict | None = None, base: str | Path | None = None) -> RunConfig:
    """Read a YAML run config. Relative local paths in it (and in `overrides`) are made absolute
    against `base`, the caller's working directory by default, before anything reaches Prefect or Ray."""
    cfg = with_absolute_paths(parse_config(read_yaml(path, overrides), str(path)), base or os.getcwd())
    cfg._origin = {"path": str(Path(path).absolute()), "overrides": dict(overrides or {}), "paths_from": str(Path(base or os.getcwd()).absolute())}
    return cfg
