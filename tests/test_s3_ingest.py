"""Acceptance: ingest from an s3:// prefix against moto's S3 server, started by the tests on 127.0.0.1.

The real `build_dataset` flow runs (Prefect + Ray); the Ray workers reach the same local server
through `storage.endpoint_url` in the config and the fake credentials conftest puts in the environment.
"""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq

from pipeline.partitions import part_name, read_table, read_tables
from pipeline.storage import Storage
from schemas.tables import REJECTS
from tests.helpers.config import run_config
from tests.helpers.images import scene_jpeg

GOOD = {f"raw/scene_{i}.jpg": (i, 1100 + 40 * i, 1150 + 30 * i) for i in range(5)}  # seed, width, height
BAD = {"raw/notes.jpg": b"not an image"}


def _upload(storage: Storage, bucket: str) -> dict[str, bytes]:
    """Upload the inputs (plus an object outside raw/ that must be ignored); returns URI -> bytes."""
    uploaded = {}
    for key, (seed, w, h) in GOOD.items():
        uploaded[f"s3://{bucket}/{key}"] = scene_jpeg(seed, w, h)
    for key, data in BAD.items():
        uploaded[f"s3://{bucket}/{key}"] = data
    for uri, data in uploaded.items():
        storage.write_bytes(uri, data)
    storage.write_bytes(f"s3://{bucket}/elsewhere/ignored.jpg", scene_jpeg(99, 1200, 1200))
    return uploaded


def _config(bucket: str, endpoint: str, work: str, output: str) -> dict:
    return run_config(None, f"s3://{bucket}/raw/", work=work, output=output, storage={"endpoint_url": endpoint},
                      ingest={"partition_size": 2})


def _tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _check_counts(dataset: dict) -> None:
    c = dataset["counts"]
    assert c["inputs"] == len(GOOD) + len(BAD) == 6
    assert c["samples"] == len(GOOD)
    assert c["rejected"] == len(BAD)
    assert c["inputs"] == c["samples"] + c["rejected"]
    assert c["rejected_by_reason"] == {"not_an_image": 1}
    assert c["shards"] == 1


def test_ingest_from_s3_prefix(build, s3_endpoint, s3_bucket, tmp_path):
    storage = Storage(endpoint_url=s3_endpoint)
    uploaded = _upload(storage, s3_bucket)
    out = tmp_path / "ds"
    dataset = build(_config(s3_bucket, s3_endpoint, str(tmp_path / "work"), str(out)))
    _check_counts(dataset)

    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    good_uris = sorted(u for u in uploaded if "scene_" in u)
    assert sorted(r["source"] for r in manifest) == good_uris  # sources are the s3:// URIs
    for r in manifest:
        seed, w, h = GOOD[r["source"].split("/", 3)[3]]
        assert (r["width"], r["height"]) == (w, h)

    # the stored image bytes are the uploaded bytes, untouched
    images = _tar_members((out / "image" / "image_000000.tar").read_bytes())
    by_source = {r["source"]: r["key"] for r in manifest}
    for uri in good_uris:
        assert images[f"{by_source[uri]}.jpg"] == uploaded[uri]
    texts = _tar_members((out / "text_box" / "text_box_000000.tar").read_bytes())
    assert sorted(texts) == sorted(f"{k}.json" for k in by_source.values())

    # the reject names the S3 object and why
    rejects = read_tables(Storage(), str(tmp_path / "work" / "test" / "ingest"), "rejects", REJECTS).to_pylist()
    assert [(r["source_uri"], r["reason"]) for r in rejects] == [(f"s3://{s3_bucket}/raw/notes.jpg", "not_an_image")]
    run = json.loads((tmp_path / "work" / "test" / "run.json").read_text())
    ingest = next(s for s in run["stages"] if s["stage"] == "ingest")
    assert ingest["partitions"] == 3 and ingest["computed"] == 3 and ingest["skipped"] == 0


def test_work_dir_and_shards_on_s3(build, s3_endpoint, s3_bucket):
    storage = Storage(endpoint_url=s3_endpoint)
    uploaded = _upload(storage, s3_bucket)
    work, out = f"s3://{s3_bucket}/work", f"s3://{s3_bucket}/ds"
    config = _config(s3_bucket, s3_endpoint, work, out)

    dataset = build(config, run_id="s3run")
    _check_counts(dataset)
    for name in ("dataset.json", "manifest.parquet", "image/sizes.json", "text_box/sizes.json",
                 "image/image_000000.tar", "text_box/text_box_000000.tar"):
        assert storage.exists(f"{out}/{name}"), name
    assert json.loads(storage.read_bytes(f"{out}/dataset.json"))["counts"] == dataset["counts"]
    assert json.loads(storage.read_bytes(f"{out}/image/sizes.json")) == {"image_000000.tar": len(GOOD)}

    from pipeline.inspection import describe_dataset

    shown = describe_dataset(out, storage)  # `localcap inspect s3://...` reads the same way
    assert f"samples   {len(GOOD)} in 1 shards" in shown and "not_an_image" in shown

    # the stage partitions live on S3 too
    ingest_dir = f"{work}/s3run/ingest"
    assert [n for n in storage.list_prefix(ingest_dir) if not n.startswith("_attempt-")] == [
            "_plan.json", "_report.json",  # for `localcap status`
        *(part_name(k) for k in range(3)),
        *(part_name(k, "rejects") for k in range(3)),
    ]
    manifest = read_table(storage, f"{out}/manifest.parquet").to_pylist()
    assert sorted(r["source"] for r in manifest) == sorted(u for u in uploaded if "scene_" in u)
    images = _tar_members(storage.read_bytes(f"{out}/image/image_000000.tar"))
    for r in manifest:
        assert images[f"{r['key']}.jpg"] == uploaded[r["source"]]

    run = json.loads(storage.read_bytes(f"{work}/s3run/run.json"))
    first = {s["stage"]: s for s in run["stages"]}
    assert first["ingest"]["computed"] == 3 and first["ingest"]["skipped"] == 0

    # a rerun of the same run id skips every finished partition
    tar_before = storage.read_bytes(f"{out}/image/image_000000.tar")
    again = build(config, run_id="s3run")
    assert again["counts"] == dataset["counts"]
    run = json.loads(storage.read_bytes(f"{work}/s3run/run.json"))
    stages = {s["stage"]: s for s in run["stages"]}
    assert stages["ingest"]["partitions"] == 3
    assert stages["ingest"]["skipped"] == 3 and stages["ingest"]["computed"] == 0
    assert stages["dedupe"]["skipped"] == 1
    assert stages["shard"]["skipped"] == 1
    assert storage.read_bytes(f"{out}/image/image_000000.tar") == tar_before

    # a changed input object (new ETag) redoes only its partition
    storage.write_bytes(f"s3://{s3_bucket}/raw/scene_0.jpg", scene_jpeg(50, 1300, 1300))
    third = build(config, run_id="s3run")
    assert third["counts"]["samples"] == len(GOOD)
    stages = {s["stage"]: s for s in json.loads(storage.read_bytes(f"{work}/s3run/run.json"))["stages"]}
    assert stages["ingest"]["computed"] == 1 and stages["ingest"]["skipped"] == 2
