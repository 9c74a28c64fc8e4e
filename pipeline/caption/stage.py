"""The caption stage: one ingest partition's kept images and their boxes in, a captions table out.

Requests are built and sent a batch at a time (each image decoded once for all its requests), the
answers cleaned (captioners.cleanup), and every box and every global caption gets exactly one row:
`ok`, a rejection reason, or `backend_error`. A partition that recorded back-end errors is redone
on the next run, reusing its `ok` rows, so a rerun captions only what failed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from queue import Queue

import pyarrow as pa
import pyarrow.compute as pc

from captioners.backends import Backend, make_backend
from captioners.cleanup import clean_caption
from captioners.prompts import resolve_prompts
from captioners.requests import CaptionRequest, CaptionResult, build_requests
from pipeline.dedupe.stage import partition_skips
from pipeline.partitions import part_name, read_table
from pipeline.regions.stage import read_boxes
from pipeline.stage import Actors, Partition, Stage, StageResult, Tasks
from pipeline.storage import Storage, join
from schemas.config import CaptionerSection
from schemas.tables import CAPTIONS, GLOBAL_REGION, CaptionStatus, rows_to_table

STAGE = "caption"


@dataclass(frozen=True)
class CaptionPayload:
    images_uri: str  # an ingest partition
    regions_uri: str | None  # its regions partition (None: global captions only)
    skip_sources: frozenset[str]  # dropped as duplicates
    previous_uri: str | None  # this partition's earlier captions, whose ok rows are reused
    config: CaptionerSection
    storage: Storage


def caption_row(req: CaptionRequest, result: CaptionResult, model_id: str, backend: str, prompt_id: str) -> dict:
    if result.error is not None:
        text, status, detail = None, CaptionStatus.BACKEND_ERROR, result.error[:2000]
    else:
        text, reason = clean_caption(result.text)
        status, detail = (CaptionStatus.OK, None) if reason is None else (reason, (result.text or "")[:2000])
    return {"uid": req.uid, "region_id": req.region_id, "box": req.box, "text": text, "model": model_id, "backend": backend,
            "prompt_id": prompt_id, "prompt_tokens": result.prompt_tokens, "n_tokens": result.n_tokens,
            "status": status.value, "detail": detail}


def _row_key(uid: str, region_id: int, box) -> tuple:
    return uid, region_id, tuple(box) if box is not None else None


def reusable_rows(payload: CaptionPayload) -> dict[tuple, dict]:
    """ok rows of this partition's earlier output (same inputs: the stage fingerprint matched)."""
    if payload.previous_uri is None or not payload.storage.exists(payload.previous_uri):
        return {}
    t = read_table(payload.storage, payload.previous_uri)
    return {_row_key(r["uid"], r["region_id"], r["box"]): r for r in t.to_pylist() if r["status"] == CaptionStatus.OK.value}


def caption_isolating_failures(backend: Backend, batch: list[CaptionRequest]) -> list[CaptionResult]:
    """The batch's results. When the back end raises on a batch (one bad request can fail a whole
    engine call), each request is retried alone, so only the bad ones fail."""
    try:
        results = backend.caption(batch)
        if len(results) != len(batch):
            raise RuntimeError(f"back end answered {len(results)} of {len(batch)} requests")
        return results
    except Exception as exc:  # an engine error inside this process; a dead process is Ray's to retry
        if len(batch) == 1:
            return [CaptionResult(error=f"{type(exc).__name__}: {exc}")]
    return [caption_isolating_failures(backend, [r])[0] for r in batch]


def request_batches(payload: CaptionPayload, prompt_set, reuse: dict[tuple, dict], rows: list[dict], model_id: str,
                    backend_name: str) -> Iterator[list[CaptionRequest]]:
    """Batches of at least captioner.batch_size requests (whole images), skipping what `reuse` already
    holds (those rows, and rows of requests that could not be built, go straight to `rows`)."""
    cfg = payload.config
    global_prompt = prompt_set.global_ if cfg.global_caption else None
    images = read_table(payload.storage, payload.images_uri, columns=["uid", "source_uri", "width", "height", "image"])
    boxes = read_boxes(payload.storage, payload.regions_uri)
    batch: list[CaptionRequest] = []
    for uid, src, w, h, data in zip(*(images[c].to_pylist() for c in ("uid", "source_uri", "width", "height", "image"))):
        if src in payload.skip_sources:
            continue
        image_boxes = boxes.get(uid, [])
        wanted = list(enumerate(image_boxes)) + ([(GLOBAL_REGION, None)] if global_prompt else [])
        todo = set()
        for region_id, box in wanted:
            old = reuse.get(_row_key(uid, region_id, box))
            if old is not None:
                rows.append(old)
            else:
                todo.add(region_id)
        if not todo:
            continue
        try:
            reqs = build_requests(uid, data, w, h, image_boxes, prompt_set.local, global_prompt, cfg.max_pixels)
        except Exception as exc:  # ingest decoded it, so this is unexpected; record it, do not crash
            error = CaptionResult(error=f"building the request: {type(exc).__name__}: {exc}")
            rows.extend(caption_row(CaptionRequest(uid, rid, box, [], ""), error, model_id, backend_name, prompt_set.prompt_id)
                        for rid, box in wanted if rid in todo)
            continue
        batch.extend(r for r in reqs if r.region_id in todo)
        if len(batch) >= cfg.batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Iterate `items` in a background thread, `depth` ahead: requests for the next batch are
    decoded and resized (PIL releases the GIL) while the engine generates the current one."""
    queue: Queue = Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in items:
                queue.put(item)
        except BaseException as exc:  # handed to the consumer
            queue.put(exc)
        queue.put(done)

    threading.Thread(target=produce, daemon=True, name="caption-requests").start()
    while (item := queue.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def caption_partition(payload: CaptionPayload, backend: Backend) -> pa.Table:
    cfg = payload.config
    prompt_set = resolve_prompts(cfg.prompt_id, cfg.local_prompt, cfg.global_prompt)
    rows: list[dict] = []
    batches = request_batches(payload, prompt_set, reusable_rows(payload), rows, backend.model_id, backend.name)
    for batch in prefetch(batches):
        results = caption_isolating_failures(backend, batch)
        rows.extend(caption_row(r, res, backend.model_id, backend.name, prompt_set.prompt_id) for r, res in zip(batch, results))
    rows.sort(key=lambda r: (r["uid"], r["region_id"]))
    return rows_to_table(rows, CAPTIONS)


def failed_partition(payload: CaptionPayload, error: str) -> dict[str, pa.Table]:
    """What a partition records when its back end died on it after every retry: each of its
    requests as backend_error (ok rows of an earlier attempt kept), so nothing is lost."""
    cfg = payload.config
    prompt_set = resolve_prompts(cfg.prompt_id, cfg.local_prompt, cfg.global_prompt)
    images = read_table(payload.storage, payload.images_uri, columns=["uid", "source_uri"])
    boxes = read_boxes(payload.storage, payload.regions_uri)
    reuse = reusable_rows(payload)
    rows = []
    for uid, src in zip(images["uid"].to_pylist(), images["source_uri"].to_pylist()):
        if src in payload.skip_sources:
            continue
        wanted = list(enumerate(boxes.get(uid, []))) + ([(GLOBAL_REGION, None)] if cfg.global_caption else [])
        for region_id, box in wanted:
            old = reuse.get(_row_key(uid, region_id, box))
            rows.append(old or caption_row(CaptionRequest(uid, region_id, box, [], ""), CaptionResult(error=error),
                                           cfg.model_ref, cfg.backend, prompt_set.prompt_id))
    rows.sort(key=lambda r: (r["uid"], r["region_id"]))
    return {"part": rows_to_table(rows, CAPTIONS)}


class CaptionStage(Stage):
    """One captions row per box and per global caption. Engines (vLLM, transformers) live in
    long-lived actors, one per GPU (or one on CPU), placed by GPU count and accelerator type; the
    openai client is cheap and runs in plain tasks."""

    name = STAGE
    needs = ("ingest", "dedupe", "regions")
    outputs = {"part": CAPTIONS}
    marker = "captions"

    def enabled(self) -> bool:
        return self.config.captioner.backend != "none"

    def check_cluster(self) -> None:
        if self.config.captioner.backend in ("vllm", "transformers"):
            from captioners.placement import actor_count

            actor_count(self.config.captioner)  # NoAccelerator (a ValueError) names the field

    def resources(self) -> Tasks | Actors:
        cfg = self.config.captioner
        if cfg.backend == "openai":
            return Tasks()
        from captioners.placement import actor_placement

        placement = actor_placement(cfg)
        return Actors(placement.count, placement.resources)

    def partitions(self, inputs: dict[str, StageResult]) -> list[Partition]:
        cfg, regions, out = self.config.captioner, inputs["regions"], []
        for i, ingest_fp in enumerate(inputs["ingest"].fingerprints):
            skip = partition_skips(self.ctx, i)
            regions_uri = join(self.ctx.stage_dir("regions"), part_name(i)) if regions.on else None
            payload = CaptionPayload(join(self.ctx.stage_dir("ingest"), part_name(i)), regions_uri, skip, None, cfg, self.storage)
            out.append(Partition([cfg.model_dump(mode="json"), regions.fingerprints[i] if regions.on else ingest_fp, sorted(skip)], payload))
        return out

    def setup(self) -> None:
        self.backend = make_backend(self.config.captioner)

    def process(self, payload: CaptionPayload) -> dict[str, pa.Table]:
        return {"part": caption_partition(payload, self.backend)}

    def recorded_failures(self, index: int) -> int:
        """Back-end errors: redone on the next run, reusing the partition's ok rows."""
        status = read_table(self.storage, self.part_uri(index), columns=["status"])["status"]
        return int(pc.sum(pc.equal(status, CaptionStatus.BACKEND_ERROR.value)).as_py() or 0)

    def redo_payload(self, payload: CaptionPayload, index: int) -> CaptionPayload:
        return replace(payload, previous_uri=self.part_uri(index))

    def failed(self, payload: CaptionPayload, error: str) -> dict[str, pa.Table]:
        return failed_partition(payload, error)
