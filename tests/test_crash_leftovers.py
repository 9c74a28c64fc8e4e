"""Issue 17, points 3 and 4 (and part of 1): what a crash leaves (temporary files, incomplete S3
multipart uploads) is removed by the next run of the same run id / the rerun of the same publish;
LATEST never moves backwards when two publishers' final steps interleave; a version whose
dataset.json is broken does not break `localcap versions`. Real processes are SIGKILLed, against a
real S3 HTTP endpoint (moto's server)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pipeline import versions
from pipeline.executor import PartitionJob, run_stage
from pipeline.partitions import part_name
from pipeline.storage import Storage, is_temp_name, join, temp_name, temp_target
from pipeline.versions import list_versions, move_latest, publish_version, resolve
from tests.helpers.datasets import fake_dataset

pytestmark = pytest.mark.no_ps3_conformance  # the datasets here are made by hand: tars of random bytes

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def _temporaries(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots if root.exists() for p in root.rglob("*") if is_temp_name(p.name))


def _uploads(client, bucket: str) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    return Storage(endpoint_url=s3_endpoint)


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _kill_mid_multipart(proc: subprocess.Popen, client, bucket: str) -> None:
    """SIGKILL `proc` once one of its multipart uploads has a part stored."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        ups = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        if any(client.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts") for u in ups):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    _kill(proc)
    assert _uploads(client, bucket), "the kill left no incomplete upload: nothing tested"


# -- temporary names -------------------------------------------------------------------------------
def test_temporary_names_are_recognised():
    name = temp_name("image_000000.tar")
    assert name.startswith(".image_000000.tar.") and name.endswith(".part") and temp_target(name) == "image_000000.tar"
    assert temp_target(temp_name(part_name(3))) == part_name(3)
    assert temp_target(f".{part_name(0)}.k2_x9abc.part") == part_name(0)  # tempfile.mkstemp's, older versions
    for not_temp in ("image_000000.tar", "image_000000.tar.part", ".hidden", part_name(0), ".x.part", "_plan.json"):
        assert not is_temp_name(not_temp), not_temp  # pull's resumable `NAME.part` files are not ours to remove


def test_atomic_writes_use_recognised_names(tmp_path):
    seen = []
    with Storage().atomic_path(str(tmp_path / "a.bin")) as tmp:
        seen.append(Path(tmp).name)
        Path(tmp).write_bytes(b"x")
    assert temp_target(seen[0]) == "a.bin" and (tmp_path / "a.bin").read_bytes() == b"x"
    assert _temporaries(tmp_path) == []


# -- SIGKILL during shard writing ----------------------------------------------------------------------
_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import pyarrow as pa
    from pipeline.storage import Storage
    from pipeline.partitions import _write_parquet, part_name
    s = Storage()
    work, out = sys.argv[1], sys.argv[2]
    # As write_shard and write_table do: the tar and the partition go to temporaries first.
    with s.atomic_path(out + "/image/image_000000.tar") as tar, s.atomic_path(work + "/shard/" + part_name(0)) as part:
        open(tar, "wb").write(b"half a tar" * 1000)
        _write_parquet(pa.table({"key": ["a"]}), part)
        with s.atomic_path(out + "/manifest.parquet") as manifest:
            print("writing", flush=True)
            time.sleep(600)
""")

SCHEMA = pa.schema([("key", pa.string())])


def _write_tar(payload):
    """A shard-like partition: a tar into the output folder (atomically), then the part marker."""
    out, index = payload
    with Storage().atomic_path(f"{out}/image/image_{index:06d}.tar") as tmp:
        Path(tmp).write_bytes(b"tar %d" % index)
    return {"part": pa.table({"key": [f"k{index}"]}, schema=SCHEMA)}


def test_sigkill_during_shard_writing_then_rerun_leaves_no_temporary(ray_local, tmp_path):
    run_dir, out = tmp_path / "work" / "r1", tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(run_dir), str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == b"writing"
    finally:
        _kill(proc)
    left = _temporaries(run_dir, out)
    assert len(left) == 3 and {temp_target(Path(p).name) for p in left} == {"image_000000.tar", part_name(0), "manifest.parquet"}
    assert not (out / "image" / "image_000000.tar").exists()
    # An older checkout's mkstemp leftover is recognised too.
    (run_dir / ".run.json.ab_c1234.part").write_bytes(b"{")

    jobs = [PartitionJob(i, f"fp{i}", (str(out), i)) for i in range(2)]
    report = run_stage("shard", str(run_dir), jobs, _write_tar, Storage(), progress=False, outputs=[str(out)])
    assert report.computed == 2
    assert _temporaries(run_dir, out) == []
    assert sorted(p.name for p in (out / "image").iterdir()) == ["image_000000.tar", "image_000001.tar"]
    # A rerun with everything done still takes leftovers away.
    (out / "image" / temp_name("image_000001.tar")).write_bytes(b"x")
    assert run_stage("shard", str(run_dir), jobs, _write_tar, Storage(), progress=False, outputs=[str(out)]).skipped == 2
    assert _temporaries(run_dir, out) == []


def test_s3_folders_lose_their_incomplete_uploads(s3, s3_bucket):
    client = s3.s3
    for key in (f"work/r1/shard/{part_name(0)}", "ds/image/image_000000.tar", "elsewhere/x.tar"):
        up = client.create_multipart_upload(Bucket=s3_bucket, Key=key)
        client.upload_part(Bucket=s3_bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 100)
    assert s3.remove_temporaries(f"s3://{s3_bucket}/work/r1") == 1
    assert s3.remove_temporaries(f"s3://{s3_bucket}/ds", recursive=True) == 1
    assert _uploads(client, s3_bucket) == ["elsewhere/x.tar"]  # another prefix's upload is not touched


# -- SIGKILL during a multipart publish ------------------------------------------------------------------
_KILLED_PUBLISH = textwrap.dedent("""
    import sys, time
    from pipeline.storage import Storage
    from pipeline.versions import publish_version
    s = Storage(endpoint_url=sys.argv[1])
    # Slow parts, so that the kill lands while uploads are incomplete.
    s.s3.meta.events.register("before-call.s3.UploadPart", lambda **kw: time.sleep(0.4))
    publish_version(s, sys.argv[2], sys.argv[3], concurrency=2, part_size=5 * 2**20, progress=False)
    print("finished", flush=True)
""")


def test_sigkill_during_multipart_publish_then_rerun_leaves_no_incomplete_upload(s3, s3_bucket, tmp_path):
    ds = fake_dataset(tmp_path / "ds", "big", tar_sizes=(16 * MiB, 16 * MiB + 7))
    name = f"s3://{s3_bucket}/scenes"
    client = s3.s3
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PUBLISH, s3.endpoint_url, str(ds), name], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _kill_mid_multipart(proc, client, s3_bucket)
    finally:
        _kill(proc)
    assert list_versions(s3, name) == []

    done = publish_version(s3, ds, name, concurrency=2, part_size=5 * MiB, progress=False)
    assert (done.version, done.resumed, done.latest) == ("v1", True, "v1")
    assert _uploads(client, s3_bucket) == []
    assert _temporaries(ds) == []
    for tar in ("image_000000.tar", "image_000001.tar"):
        assert s3.read_bytes(f"{name}/shards/image/{tar}") == (ds / "image" / tar).read_bytes()  # the shard store


def test_a_failed_publish_aborts_its_multipart_uploads(s3, s3_bucket, tmp_path):
    """A part fails, and boto3's own abort of that upload fails too: the publish aborts it itself."""
    ds = fake_dataset(tmp_path / "ds", "fails", tar_sizes=(11 * MiB,))
    name = f"s3://{s3_bucket}/failing"
    storage = Storage(endpoint_url=s3.endpoint_url)
    calls = {"UploadPart": 0, "AbortMultipartUpload": 0}

    class Broken(Exception):
        pass

    def hook(model, **_):
        calls[model.name] += 1
        if (model.name, calls[model.name]) in {("UploadPart", 2), ("AbortMultipartUpload", 1)}:
            raise Broken(model.name)

    storage.s3.meta.events.register("before-call.s3.UploadPart", hook)
    storage.s3.meta.events.register("before-call.s3.AbortMultipartUpload", hook)
    with pytest.raises(Broken):
        publish_version(storage, ds, name, concurrency=1, part_size=5 * MiB, progress=False)
    assert calls["AbortMultipartUpload"] >= 2  # boto3's (failed), then the publish's
    assert _uploads(s3.s3, s3_bucket) == []
    assert list_versions(s3, name) == []


def test_a_resumed_publish_to_a_local_name_removes_its_temporaries(tmp_path):
    """A publish killed mid-copy left temporaries of its shards (under the numbers it took) and of
    LATEST: the rerun of the same build takes the same numbers and removes them."""
    ds = fake_dataset(tmp_path / "ds", "local")
    name = tmp_path / "published"
    inc = versions.build_increment(ds, set(), tmp_path / "scratch")
    base = versions.allocate_shards(Storage(), str(name), inc.content_id("paired"), len(inc.tars))
    stale = [name / "shards" / "image" / temp_name(f"image_{base:06d}.tar"), name / "shards" / "text_box" / temp_name(f"text_box_{base:06d}.tar")]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    (name / temp_name("LATEST")).write_bytes(b"v")
    done = publish_version(Storage(), ds, str(name), progress=False)
    assert (done.version, done.resumed, done.latest) == ("v1", True, "v1")
    assert _temporaries(name) == []


# -- LATEST never moves backwards -----------------------------------------------------------------------
class _Interleaved(Storage):
    """A publisher whose LATEST write is held back until `meanwhile()` has run: it read LATEST (and
    found no newer complete version) before another publisher finished, and writes after it."""

    def __init__(self, meanwhile, **kw):
        super().__init__(**kw)
        self.meanwhile, self.held = meanwhile, 0

    def replace_if(self, uri, data, tag):
        if uri.endswith("/LATEST") and not self.held:
            self.held += 1
            self.meanwhile()
        return super().replace_if(uri, data, tag)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_interleaved_final_steps_end_at_the_highest_version(where, request, tmp_path):
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        name, kw = f"s3://{request.getfixturevalue('s3_bucket')}/raced", {"endpoint_url": endpoint}
    else:
        name, kw = str(tmp_path / "raced"), {}
    plain = Storage(**kw)
    builds = {v: fake_dataset(tmp_path / f"build-{v}", v) for v in ("a", "b", "c")}
    assert publish_version(plain, builds["a"], name, progress=False).version == "v1"
    # v2 and v3 are claimed; v2's publisher reaches its LATEST step first, then stalls there while
    # v3's publisher finishes entirely; then v2's write happens.
    v2_storage = _Interleaved(lambda: results.append(publish_version(plain, builds["c"], name, progress=False)), **kw)
    results: list = []
    v2 = publish_version(v2_storage, builds["b"], name, progress=False)
    [v3] = results
    assert (v2.version, v3.version) == ("v2", "v3") and v2_storage.held == 1
    assert v3.latest == "v3" and v2.latest == "v3"  # v2 found LATEST moved past it: it did not write
    assert plain.read_bytes(join(name, "LATEST")) == b"v3"
    assert [v.version for v in list_versions(plain, name)] == ["v1", "v2", "v3"]
    assert resolve(plain, name) == join(name, "v3")


def test_final_steps_in_reverse_order_keep_latest_at_the_higher_version(s3, s3_bucket, tmp_path, monkeypatch):
    name = f"s3://{s3_bucket}/reversed"
    final_steps = []
    monkeypatch.setattr(versions, "move_latest", lambda storage, name_uri, n: final_steps.append(n) or "?")
    for tag in ("a", "b", "c"):
        publish_version(s3, fake_dataset(tmp_path / tag, tag), name, progress=False)
    monkeypatch.undo()
    # Each publish first moves LATEST to the newest whole version (here: a no-op), then to its own.
    assert final_steps[-1] == 3 and sorted(set(final_steps)) == [1, 2, 3] and not s3.exists(join(name, "LATEST"))
    assert move_latest(s3, name, 1) == "v3"  # v2 and v3 are complete: LATEST goes to the highest
    assert move_latest(s3, name, 3) == "v3"
    assert move_latest(s3, name, 2) == "v3"
    assert s3.read_bytes(join(name, "LATEST")) == b"v3"


def test_a_stale_conditional_write_is_refused(s3, s3_bucket, tmp_path):
    for storage, uri in ((s3, f"s3://{s3_bucket}/x/LATEST"), (Storage(), str(tmp_path / "x" / "LATEST"))):
        assert storage.read_tagged(uri) == (None, None)
        assert storage.replace_if(uri, b"v1", None)
        assert not storage.replace_if(uri, b"v9", None)  # it exists now
        data, tag = storage.read_tagged(uri)
        assert data == b"v1" and storage.replace_if(uri, b"v2", tag)
        assert not storage.replace_if(uri, b"v1", tag)  # read before v2 was written: refused
        assert storage.read_bytes(uri) == b"v2"


# -- versions listing with a broken dataset.json -----------------------------------------------------------
def test_versions_listing_marks_a_broken_dataset_json(s3, s3_bucket, tmp_path):
    name = f"s3://{s3_bucket}/listed"
    for tag in ("a", "b", "c", "d"):
        publish_version(s3, fake_dataset(tmp_path / tag, tag), name, progress=False)
    s3.write_bytes(join(name, "v2", "dataset.json"), b"{not json")
    s3.write_bytes(join(name, "v3", "dataset.json"), json.dumps({"created_at": "t", "layout": "paired", "counts": {"samples": "seven", "shards": 1}}).encode())
    s3.write_bytes(join(name, "v4", "files.json"), b"[1, 2]")
    listed = list_versions(s3, name)
    assert [v.version for v in listed] == ["v1", "v2", "v3", "v4"]
    assert listed[0].broken is None and (listed[0].samples, listed[0].shards) == (1, 1)
    assert listed[1].broken.startswith("dataset.json: BadMetadata") and "not JSON" in listed[1].broken
    assert listed[2].broken.startswith("dataset.json: BadMetadata") and "counts.samples is 'seven', not an integer" in listed[2].broken
    assert listed[3].broken.startswith("files.json: AttributeError") and listed[3].latest

    from flows.cli import app

    out = CliRunner().invoke(app, ["versions", name])
    assert out.exit_code == 0, out.output
    assert "v1" in out.output and "v4" in out.output


# -- kill -9 at three points of a publish, rerun (issue 32) -----------------------------------------------
_KILLED_AT = textwrap.dedent("""
    import os, signal, sys, time
    from pipeline.storage import Storage
    from pipeline.versions import publish_version

    point = sys.argv[4]

    class KilledBeforeLatest(Storage):
        def replace_if(self, uri, data, tag):
            if uri.endswith("/LATEST"):
                os.kill(os.getpid(), signal.SIGKILL)
            return super().replace_if(uri, data, tag)

    s = (KilledBeforeLatest if point == "before_latest" else Storage)(endpoint_url=sys.argv[1])
    s.s3.meta.events.register("before-call.s3.UploadPart", lambda **kw: time.sleep(0.4))  # time to kill mid-upload
    first = (lambda path: os.kill(os.getpid(), signal.SIGKILL)) if point == "after_first_shard" else None
    publish_version(s, sys.argv[2], sys.argv[3], concurrency=1, part_size=5 * 2**20, progress=False, after_upload=first)
    print("finished", flush=True)
""")


def _objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k[len(prefix):]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_gc_aborts_the_uploads_of_a_publisher_killed_and_never_rerun(s3, s3_bucket, tmp_path):
    """A publish killed in the middle of a multipart upload and never rerun (its build was thrown
    away): gc lists the upload (a dry run aborts nothing), and --delete aborts it and deletes the
    tars that landed; gc leaves a publish begun less than pending_hours ago alone."""
    from pipeline.versions import collect_garbage

    ds = fake_dataset(tmp_path / "ds", "g", tar_sizes=(16 * MiB, 16 * MiB + 3))
    name = f"s3://{s3_bucket}/abandoned"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_AT, s3.endpoint_url, str(ds), name, "mid_multipart"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _kill_mid_multipart(proc, s3.s3, s3_bucket)
    finally:
        _kill(proc)
    left = _uploads(s3.s3, s3_bucket)
    assert collect_garbage(s3, name, keep=1, delete=True).uploads == [] and _uploads(s3.s3, s3_bucket) == left  # begun just now
    plan = collect_garbage(s3, name, keep=1, pending_hours=0)
    assert sorted(join(name, "shards", u) for u in plan.uploads) == sorted(f"s3://{s3_bucket}/{k}" for k in left)
    assert _uploads(s3.s3, s3_bucket) == left  # a dry run
    collect_garbage(s3, name, keep=1, delete=True, pending_hours=0)
    assert _uploads(s3.s3, s3_bucket) == [] and not s3.list_prefix(join(name, "shards", "image"))


@pytest.mark.parametrize("point", ["after_first_shard", "mid_multipart", "before_latest"])
def test_sigkill_at_three_points_of_a_publish_then_rerun_finishes_v1(s3, s3_bucket, tmp_path, point):
    """Killed after the first shard landed, in the middle of a multipart upload, or after the
    commit but before LATEST: the rerun ends with v1 only (no gap), no incomplete multipart upload,
    and objects byte-identical to an uninterrupted publish (times in files.json and the staged
    listing aside)."""
    ds = fake_dataset(tmp_path / "ds", "k", tar_sizes=(16 * MiB, 16 * MiB + 3))
    name = f"s3://{s3_bucket}/{point}"  # the parameters share a bucket (its name is cut to 50 characters)
    client = s3.s3
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_AT, s3.endpoint_url, str(ds), name, point], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if point == "mid_multipart":
            _kill_mid_multipart(proc, client, s3_bucket)
        else:
            proc.wait(timeout=120)
            assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-3000:]
    finally:
        _kill(proc)
    assert [v.version for v in list_versions(s3, name)] == ([] if point != "before_latest" else ["v1"])

    done = publish_version(s3, ds, name, concurrency=2, part_size=5 * MiB, progress=False)
    assert done.version == "v1" and done.latest == "v1"
    assert [v.version for v in list_versions(s3, name)] == ["v1"] and s3.read_bytes(join(name, "LATEST")) == b"v1"
    assert not s3.exists(join(name, "_claims", "v2.json"))
    assert _uploads(client, s3_bucket) == []
    clean = publish_version(s3, ds, f"s3://{s3_bucket}/{point}-clean", concurrency=2, part_size=5 * MiB, progress=False)
    assert clean.version == "v1"
    timed = ("v1/files.json", "v1/dataset.json", "_claims/v1.json", "_next_shard")
    got, want = _objects(client, s3_bucket, f"{point}/"), _objects(client, s3_bucket, f"{point}-clean/")
    same = lambda objs: {k: v for k, v in objs.items() if k not in timed and not k.startswith("_staged/")}  # noqa: E731
    assert same(got) == same(want) and any(k.startswith("shards/image/") for k in got)
    assert json.loads(got["v1/dataset.json"])["counts"] == json.loads(want["v1/dataset.json"])["counts"]
