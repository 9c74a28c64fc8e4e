"""Fetch one partition of URLs and decode-validate what arrives (img2dataset's "downloader" role).

Fetching is async (the shared Fetcher); each body is decode-validated in a worker thread as soon
as it arrives (PIL releases the GIL while decoding), so the network and the CPU overlap. A body
counts against fetch.max_bytes_in_flight from before it is read until it is decoded (`held`), so
bodies waiting for the decoder cannot pile up past the worker's budget. Every URL
row ends as an images row or a rejects row; a reject says whether a later run should retry it.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from pipeline.ingest.decode import Rejection, decode_validate
from pipeline.ingest.fetch import Fetcher, FetchResult
from schemas.config import FetchSection, IngestSection
from schemas.tables import IMAGES, REJECTS, RejectReason, reject, rows_to_table

STAGE = "ingest"


def _image_or_reject(row: dict, result: FetchResult, limits: IngestSection) -> tuple[dict | None, dict | None]:
    url = row["url"]
    if not result.ok:
        return None, reject(url, None, STAGE, result.reason, result.detail, result.retryable)
    outcome = decode_validate(result.data, url, limits)
    if isinstance(outcome, Rejection):
        return None, reject(url, outcome.uid, STAGE, outcome.reason, outcome.detail)
    meta = {**json.loads(row["meta"] or "{}"), **json.loads(outcome["meta"])}
    if result.final_url and result.final_url != url:
        meta["final_url"] = result.final_url
    outcome["meta"] = json.dumps(meta, sort_keys=True)
    return outcome, None


async def _fetch_rows(rows: list[dict], cfg: FetchSection, limits: IngestSection) -> list[tuple[dict | None, dict | None]]:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder:
        async with Fetcher(cfg, limits.max_bytes) as fetcher:

            async def one(row: dict):
                if row["skip_reason"]:
                    return None, reject(row["url"], None, STAGE, RejectReason(row["skip_reason"]), row["skip_detail"] or "")
                async with fetcher.held(row["url"]) as result:
                    return await loop.run_in_executor(decoder, _image_or_reject, row, result, limits)

            return await asyncio.gather(*(one(r) for r in rows))


def unfinished_rows(rows: list[dict], previous_images: pa.Table, previous_rejects: pa.Table) -> tuple[list[dict], pa.Table]:
    """(the URL rows a rerun fetches, the previous rejects it keeps). A row is finished when an
    earlier attempt turned it into an image or a rejection that is not retryable; a URL listed
    twice needs two such outcomes. Rows an interrupted attempt left unaccounted for are fetched too."""
    final = pa.array([not r for r in previous_rejects["retryable"].to_pylist()], pa.bool_())
    kept = previous_rejects.filter(final)
    finished = Counter(previous_images["source_uri"].to_pylist()) + Counter(kept["source_uri"].to_pylist())
    todo = []
    for row in rows:
        if finished[row["url"]] > 0:
            finished[row["url"]] -= 1
        else:
            todo.append(row)
    return todo, kept


def fetch_partition(rows: list[dict], cfg: FetchSection, limits: IngestSection,
                    previous: tuple[pa.Table, pa.Table] | None = None) -> tuple[pa.Table, pa.Table]:
    """(images, rejects) for a partition of urls-table rows. With `previous` (images, rejects) of an
    earlier attempt, only its unfinished rows (retryable failures) are fetched again; the rest is kept."""
    if previous is not None:
        rows, kept_rejects = unfinished_rows(rows, *previous)
    outcomes = asyncio.run(_fetch_rows(rows, cfg, limits)) if rows else []
    images = rows_to_table([i for i, _ in outcomes if i is not None], IMAGES)
    rejects = rows_to_table([r for _, r in outcomes if r is not None], REJECTS)
    if previous is not None:
        images = pa.concat_tables([previous[0], images])
        rejects = pa.concat_tables([kept_rejects, rejects])
    return images, rejects
