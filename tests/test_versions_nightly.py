"""Versions that live for months (issue 32): five nights of the nightly config, on a local dataset
name and on the moto S3 endpoint, with the real build flow (Ray + Prefect) every night.

Night 1 +12 images, night 2 +3, night 3 +0, night 4 +2 with the publish failing, night 5 +2:
versions v1 (12), v2 (15), nothing on nights 3 and 4, v3 (19); every version a whole snapshot,
no shard byte stored twice, LATEST always a complete snapshot, the failed night's images in v3."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline.shards.loader import open_dataset
from pipeline.storage import Storage
from pipeline.versions import collect_garbage, list_versions, resolve
from tests.helpers.config import run_config
from tests.helpers.images import scene_jpeg
from tests.helpers.prefect_home import prefect_home

REPO = Path(__file__).resolve().parents[1]

NIGHTS = [12, 3, 0, 2, 2]


def _add_images(src: Path, start: int, n: int) -> None:
    for i in range(start, start + n):
        (src / f"{i:03d}.jpg").write_bytes(scene_jpeg(900 + i, 1100 + 16 * (i % 7), 1050))


def _keys(name: str, storage: Storage, version: str | None = None) -> list[str]:
    return [s["key"] for s in open_dataset(f"{name}/{version}" if version else name, storage=storage, decode=False)]


def _stored_shards(storage: Storage, name: str) -> dict[str, str]:
    """Every tar in the shard store -> its sha256."""
    out = {}
    for folder in ("image", "text_box"):
        for tar in storage.list_prefix(f"{name}/shards/{folder}"):
            if tar.endswith(".tar"):
                out[f"{folder}/{tar}"] = hashlib.sha256(storage.read_bytes(f"{name}/shards/{folder}/{tar}")).hexdigest()
    return out


def _five_nights(nightly_run, tmp_path: Path, name: str, store: Storage, fail_publish, **sections):
    """`nightly_run(cfg, run_id)` -> the build's record, each night; (published version or None, what
    LATEST named after it) per night."""
    import flows.build as build_flow

    src = tmp_path / "incoming"
    src.mkdir()
    cfg = run_config(tmp_path, src, regions={"method": "none"}, shards={"keep_empty": True, "max_samples": 4},
                     publish={"to": name}, prefect={"retries": 0}, **sections)
    published, added, seen_latest = [], 0, []
    real_publish = build_flow.publish_version
    for night, n in enumerate(NIGHTS, start=1):
        _add_images(src, added, n)
        added += n
        if night == 4:
            build_flow.publish_version = fail_publish(real_publish)
        try:
            if night == 4:
                with pytest.raises(Exception):
                    nightly_run(cfg, run_id=f"night{night}")
                published.append(None)
            else:
                dataset = nightly_run(cfg, run_id=f"night{night}")
                p = dataset["published"]
                published.append(None if p["unchanged"] else p["version"])
                # `localcap status` names the version the night published, or why none was.
                from pipeline.status import format_status, run_status

                shown = format_status(run_status(store, cfg["run"]["work_dir"], f"night{night}"))
                said = f"published {p['uri']} (" if not p["unchanged"] else f"not published: {p['reason']} (LATEST {p['latest']})"
                assert said in shown, shown
        finally:
            build_flow.publish_version = real_publish
        latest = resolve(store, name)
        seen_latest.append(latest.rsplit("/", 1)[-1])
        assert len(set(_keys(name, store))) == len(_keys(name, store)), "a key twice in LATEST"
    return published, seen_latest


def _check_versions(name: str, storage: Storage, orphaned: range) -> None:
    versions = list_versions(storage, name)
    assert [(v.version, v.samples) for v in versions] == [("v1", 12), ("v2", 15), ("v3", 19)]
    keys = {v.version: _keys(name, storage, v.version) for v in versions}
    assert set(keys["v1"]) < set(keys["v2"]) < set(keys["v3"])  # each version the whole dataset
    assert [len(k) for k in keys.values()] == [12, 15, 19] and len(set(keys["v3"])) == 19
    # No shard stored twice: each version's tars are its parent's plus its own new ones, and the
    # store holds exactly the union (no copy of an unchanged shard under a new name).
    listings = {v.version: {e["path"]: e["sha256"] for e in json.loads(storage.read_bytes(f"{name}/{v.version}/files.json"))["files"]
                            if e["path"].endswith(".tar")} for v in versions}
    assert set(listings["v1"]) < set(listings["v2"]) < set(listings["v3"])
    for a, b in (("v1", "v2"), ("v2", "v3")):  # an unchanged shard is the same stored object in the next version
        assert all(listings[b][path] == sha for path, sha in listings[a].items())
    # The store holds v3's tars and the shard the failed night uploaded before failing (its images
    # went into night 5's shard); gc removes exactly that one, and every version still streams.
    stored = _stored_shards(storage, name)
    orphans = set(stored) - set(listings["v3"])
    assert len(orphans) in orphaned and len(set(stored.values())) == len(stored)
    plan = collect_garbage(storage, name, keep=3, pending_hours=0)
    assert set(plan.shards) == orphans and plan.dropped == [] and not plan.deleted
    assert set(_stored_shards(storage, name)) == set(stored)  # a dry run by default
    collect_garbage(storage, name, keep=3, delete=True, pending_hours=0)
    assert set(_stored_shards(storage, name)) == set(listings["v3"])
    assert [len(_keys(name, storage, v)) for v in ("v1", "v2", "v3")] == [12, 15, 19]
    info = json.loads(storage.read_bytes(f"{name}/v3/dataset.json"))
    assert info["counts"]["samples"] == 19 and info["counts"]["added"] == 4 and info["parent"] == "v2"
    assert [h["added"] for h in info["history"]] == [12, 3, 4]


def test_five_nights_local_with_a_nightly_fine_tune(ray_local, prefect_harness, tmp_path):
    """end_to_end every night, training with start previous_version: trainings on v1 (from scratch),
    v2 (from v1's run) and v3 (from v2's) only; the idle and the failed night train nothing."""
    from flows.train import end_to_end

    name = str(tmp_path / "published" / "nightly")
    storage = Storage()
    trainings = []

    def end_to_end_night(cfg, run_id):
        out = end_to_end(cfg, run_id=run_id, progress=False)
        trainings.append(out["train"] and out["train"]["metrics"])
        return out["dataset"]

    def fail_publish(real):
        def publish(*args, **kw):  # the disk fills up after the first shard lands
            def full(path):
                raise OSError(28, "No space left on device")
            return real(*args, **{**kw, "after_upload": full})
        return publish

    train = {"objective": "mae", "preset": "tiny", "output": str(tmp_path / "train"), "steps": 2, "batch_size": 2,
             "checkpoint_every": 2, "warmup_steps": 0, "start": "previous_version",
             "data": {"loader_workers": 0, "shuffle_buffer": 0, "holdout_shards": 0}}
    published, latest = _five_nights(end_to_end_night, tmp_path, name, storage, fail_publish, train=train)
    assert published == ["v1", "v2", None, None, "v3"]
    assert latest == ["v1", "v2", "v2", "v2", "v3"]
    _check_versions(name, storage, orphaned=range(1, 3))  # night 4's tars that landed before the failure
    from tests.helpers.ps3_conformance import ps3_problems

    assert ps3_problems(Path(name) / "v3") == []  # PS3's loader behaviour over the three-version snapshot
    from pipeline.inspection import describe_dataset

    shown = describe_dataset(resolve(storage, name))  # `localcap inspect NAME`: LATEST, the whole snapshot
    assert "samples   19 in " in shown and "the whole dataset: +4 -0 since v2" in shown, shown
    from pipeline.report import write_report

    page = Path(write_report(name, str(tmp_path / "report"), n_samples=4)).read_text()  # `localcap report NAME`
    assert "19 samples in " in page and "the whole dataset: +4 -0 since v2" in page
    ran = [t for t in trainings if t]
    assert len(trainings) == 4 and trainings[2] is None  # night 4's end_to_end raised before it recorded anything
    assert [Path(t["dataset"]).name for t in ran] == ["v1", "v2", "v3"]
    assert [t["train_images"] for t in ran] == [12, 15, 19]  # each training on the whole snapshot
    assert ran[0]["init_from"] is None
    for earlier, later in zip(ran, ran[1:]):  # each night's fine-tune starts from the night before's last checkpoint
        assert later["init_from"] == earlier["checkpoint"] and later["steps_this_run"] == 2


def test_five_nights_on_s3_with_the_endpoint_stopped_on_night_four(build, tmp_path, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="nightly")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    name = "s3://nightly/datasets/scenes"
    storage = Storage(endpoint)
    state = {"server": server}

    def fail_publish(real):
        def publish(*args, **kw):  # the endpoint goes away between the build and its publish
            state["server"].stop()
            try:
                return real(*args, **kw)
            finally:
                state["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
                state["server"].start()  # moto keeps its buckets in-process: the same store comes back
        return publish

    try:
        published, latest = _five_nights(build, tmp_path, name, storage, fail_publish, storage={"endpoint_url": endpoint})
    finally:
        state["server"].stop()
        state["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        state["server"].start()
    try:
        assert published == ["v1", "v2", None, None, "v3"]
        assert latest == ["v1", "v2", "v2", "v2", "v3"]
        _check_versions(name, storage, orphaned=range(0, 1))  # nothing reached the stopped endpoint
        assert not boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").list_multipart_uploads(Bucket="nightly").get("Uploads")
    finally:
        state["server"].stop()


def test_remove_block_and_gc_keep_one(build, tmp_path):
    """A takedown: `localcap remove` without and with --block publishes the next version without
    the sample, rewriting only its shard; a blocked image is rejected when ingested again, an
    unblocked one comes back; after `gc --keep 1 --delete` the kept version pulls whole (sha256
    checked) and streams every sample once."""
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline.shards.pull import pull

    src = tmp_path / "incoming"
    src.mkdir()
    _add_images(src, 0, 6)
    name = str(tmp_path / "published" / "scenes")
    cfg = run_config(tmp_path, src, regions={"method": "none"}, shards={"keep_empty": True, "max_samples": 2},
                     publish={"to": name}, prefect={"retries": 0})
    assert build(cfg, run_id="night1")["published"]["version"] == "v1"
    assert (Path(name) / "v1" / "report.html").read_text().count('src="data:image/jpeg;base64,') == 6
    storage = Storage()
    v1 = json.loads((Path(name) / "v1" / "files.json").read_text())["files"]
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(name) / "v1" / "manifest.parquet").to_pylist()
    unblocked, blocked = rows[0], rows[3]
    out = CliRunner().invoke(app, ["remove", name, "--uid", unblocked["uid"], "--no-progress"])
    assert out.exit_code == 0 and f"published {name}/v2: 5 samples" in out.output, out.output
    out = CliRunner().invoke(app, ["remove", name, "--source", blocked["source"], "--block", "--no-progress"])
    assert out.exit_code == 0 and f"published {name}/v3: 4 samples" in out.output and "blocked" in out.output, out.output
    v3 = {e["path"]: e["sha256"] for e in json.loads((Path(name) / "v3" / "files.json").read_text())["files"]}
    untouched = {e["path"]: e["sha256"] for e in v1 if e["path"].endswith(".tar")
                 and e["path"] not in (unblocked["shard"], blocked["shard"]) and "text_box" not in e["path"]}
    assert all(v3.get(p) == sha for p, sha in untouched.items())  # only the two shards that held them were rewritten
    assert unblocked["key"] not in _keys(name, storage) and blocked["key"] not in _keys(name, storage)
    out = CliRunner().invoke(app, ["remove", name, "--uid", "no-such-uid", "--no-progress"])
    assert out.exit_code == 1 and "holds no sample" in out.output

    again = build(run_config(tmp_path, src, work="work2", output="ds2", regions={"method": "none"}, shards={"keep_empty": True},
                             publish={"to": name}, prefect={"retries": 0}), run_id="night2")
    assert again["counts"]["rejected_by_reason"] == {"duplicate_published": 5}  # 4 in v3, 1 blocked
    assert again["counts"]["samples"] == 1 and again["published"]["version"] == "v4"  # the unblocked one is back
    assert sorted(_keys(name, storage)) == sorted(r["key"] for r in rows if r["key"] != blocked["key"])

    out = CliRunner().invoke(app, ["gc", name, "--keep", "1"])
    assert out.exit_code == 0 and "would delete" in out.output and "v1, v2, v3" in out.output, out.output
    out = CliRunner().invoke(app, ["gc", name, "--keep", "1", "--delete"])
    assert out.exit_code == 0 and "deleted" in out.output, out.output
    assert [v.version for v in list_versions(storage, name)] == ["v4"]
    # The reports went with their builds' versions, and v1's (thumbnails of the removed images) with v1.
    assert [v for v in ("v1", "v4") if (Path(name) / v / "report.html").exists()] == ["v4"]
    dest = tmp_path / "pulled"
    pull(storage, name, dest, progress=False)  # every file checked against files.json's sha256
    assert sorted(s["key"] for s in open_dataset(str(dest), decode=False)) == sorted(_keys(name, storage))
    assert len(_keys(name, storage)) == 5


# `localcap run`, killed (SIGKILL, the process itself) once two shard files of its publish have landed.
_RUN_KILLED_IN_PUBLISH = textwrap.dedent("""
    import os, signal, sys
    from pipeline import versions

    real, landed = versions._upload, []

    def upload(*args, **kw):
        real(*args, **kw)
        landed.append(args[1].path)
        if len(landed) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    versions._upload = upload
    from flows.cli import app
    app(sys.argv[1:])
""")


def test_a_run_killed_while_publishing_then_rerun_finishes_v1_and_counts_both_attempts(s3_endpoint, s3_bucket, prefect_harness, tmp_path):
    """kill -9 of `localcap run` (publish.to on the S3 endpoint) after two of its six shard files
    landed; the rerun of that run id publishes v1 (no gap, no v2 claim) with every image, reuses
    the shard numbers the killed attempt took (nothing else in the store), leaves no incomplete
    upload, and its dataset.json counts the stage seconds of both attempts."""
    import boto3

    src = tmp_path / "incoming"
    src.mkdir()
    _add_images(src, 0, 3)
    name = f"s3://{s3_bucket}/scenes"
    cfg = run_config(tmp_path, src, regions={"method": "none"}, shards={"keep_empty": True, "max_samples": 1},
                     publish={"to": name, "concurrency": 1}, prefect={"retries": 0}, storage={"endpoint_url": s3_endpoint},
                     ray={"num_cpus": 1})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env |= {"PREFECT_HOME": prefect_home(tmp_path / "prefect-home"), "PREFECT_API_URL": prefect_harness}
    args = ["run", str(tmp_path / "run.yaml"), "--run-id", "night1", "--no-progress"]
    killed = subprocess.run([sys.executable, "-c", _RUN_KILLED_IN_PUBLISH, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    storage = Storage(s3_endpoint)
    assert list_versions(storage, name) == [] and len(_stored_shards(storage, name)) == 2
    stage_dir = tmp_path / "work" / "night1" / "ingest"
    first_attempt = [json.loads(p.read_text())["seconds"] for p in stage_dir.glob("_attempt-*.json")]
    assert len(first_attempt) == 1 and first_attempt[0] > 0

    rerun = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert [(v.version, v.samples) for v in list_versions(storage, name)] == [("v1", 3)]
    assert storage.read_bytes(f"{name}/LATEST") == b"v1" and not storage.exists(f"{name}/_claims/v2.json")
    listing = json.loads(storage.read_bytes(f"{name}/v1/files.json"))["files"]
    assert set(_stored_shards(storage, name)) == {e["path"] for e in listing if e["path"].endswith(".tar")}
    assert sorted(_keys(name, storage)) == sorted(_keys(str(tmp_path / "ds"), Storage()))
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    timings = json.loads(storage.read_bytes(f"{name}/v1/dataset.json"))["timings"]
    assert timings["stage_seconds"]["ingest"] == pytest.approx(first_attempt[0], abs=0.01)  # the rerun had nothing to ingest
    assert timings["runs"] == 2
