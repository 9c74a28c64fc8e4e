"""Publishing versions to S3 (moto's server on 127.0.0.1), pulling them back, streaming them into a
DataLoader, and the wids index: a dataset built by the real flow."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.shards import open_dataset
from pipeline.shards.pull import parse_shards, pull
from pipeline.storage import Storage
from pipeline.versions import expected_etag, list_versions, publish_version, resolve
from tests.helpers.config import run_config
from tests.helpers.images import scene_jpeg

N_IMAGES = 7


@pytest.fixture(scope="module")
def built(ray_local, prefect_harness, tmp_path_factory) -> Path:
    from flows.build import build_dataset

    root = tmp_path_factory.mktemp("publish")
    src = root / "src"
    src.mkdir()
    for i in range(N_IMAGES):
        (src / f"{i}.jpg").write_bytes(scene_jpeg(700 + i, 1400 + 64 * i, 1100))
    cfg = run_config(root, src, shards={"max_samples": 3})
    build_dataset(cfg, run_id="pub", progress=False)
    return root / "ds"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # what the CLI and Storage() read
    return Storage(endpoint_url=s3_endpoint)


def test_publish_pull_and_stream_through_s3(built, s3, s3_bucket, tmp_path):
    name = f"s3://{s3_bucket}/datasets/scenes"
    result = publish_version(s3, built, name, concurrency=4, progress=False)
    assert (result.version, result.latest, result.resumed) == ("v1", "v1", False)
    assert resolve(s3, name) == resolve(s3, name + "/LATEST") == resolve(s3, name + "/v1") == name + "/v1"
    again = publish_version(s3, built, name, progress=False)  # same content: the same version, nothing re-sent
    assert (again.version, again.uploaded, again.resumed, again.unchanged) == ("v1", 0, False, True)
    [v1] = list_versions(s3, name)
    assert (v1.version, v1.samples, v1.shards, v1.latest) == ("v1", N_IMAGES, 3, True)

    # Pull: the bytes pulled are the bytes built; a second pull downloads nothing.
    dest = tmp_path / "pulled"
    first = pull(s3, name, dest, progress=False)
    tars = {k: v for k, v in _files(built).items() if k.endswith((".tar", "sizes.json"))}
    assert {k: v for k, v in _files(dest).items() if k in tars} == tars
    assert first.downloaded == len(json.loads(s3.read_bytes(name + "/v1/files.json"))["files"]) - 2  # wids: the copy's own
    assert pull(s3, name + "/v1", dest, progress=False).downloaded == 0
    # A partial download is resumed from where it stopped, and verified.
    tar = dest / "image" / "image_000001.tar"
    whole = tar.read_bytes()
    tar.unlink()
    (tar.parent / (tar.name + ".part")).write_bytes(whole[: len(whole) // 3])
    resumed = pull(s3, name, dest, progress=False)
    assert resumed.downloaded == 1 and resumed.bytes == len(whole) - len(whole) // 3 and tar.read_bytes() == whole
    # A subset.
    some = pull(s3, name, tmp_path / "some", shards=parse_shards("0:1"), progress=False)
    tars = sorted(p.name for p in (tmp_path / "some").rglob("*.tar"))
    assert tars == ["image_000000.tar", "text_box_000000.tar"] and some.downloaded == first.downloaded - 4
    assert json.loads((tmp_path / "some" / "image" / "sizes.json").read_text()) == {"image_000000.tar": 3}

    # Streaming straight from S3: every sample, paired, boxes and captions as in the tars.
    manifest = pq.read_table(built / "manifest.parquet").to_pylist()
    samples = list(open_dataset(name, storage=s3))
    assert [s["key"] for s in samples] == [r["key"] for r in manifest]
    for s, r in zip(samples, manifest):
        assert s["image"].size == (r["width"], r["height"]) and len(s["boxes"]) == len(s["captions"]) == r["boxes"]

    # The CLI: versions and inspect read S3 too.
    from flows.cli import app

    out = CliRunner().invoke(app, ["versions", name])
    assert out.exit_code == 0 and "v1" in out.output and f"{N_IMAGES} samples" in out.output
    out = CliRunner().invoke(app, ["inspect", name, "-n", "1"])
    assert out.exit_code == 0 and f"samples   {N_IMAGES} in 3 shards" in out.output


def test_interrupted_publish_is_invisible_then_completed(built, s3, s3_bucket, tmp_path):
    """A publish killed after two shard files landed: no reader sees a new version; the rerun of
    the same build takes the same shard numbers, skips what landed and finishes v1."""
    name = f"s3://{s3_bucket}/scenes"

    class Killed(Exception):
        pass

    landed = []

    def die_after_two(path: str) -> None:
        landed.append(path)
        if len(landed) == 2:
            raise Killed(path)

    with pytest.raises(Killed):
        publish_version(s3, built, name, concurrency=1, progress=False, after_upload=die_after_two)
    assert s3.exists(f"{name}/shards/{landed[0]}")  # shards of v1 exist ...
    assert list_versions(s3, name) == []  # ... but no reader sees a version
    with pytest.raises(FileNotFoundError):
        resolve(s3, name)
    done = publish_version(s3, built, name, progress=False)
    assert (done.version, done.resumed, done.latest) == ("v1", True, "v1") and done.skipped >= 2
    assert [v.version for v in list_versions(s3, name)] == ["v1"]


def test_build_flow_publishes_the_next_version(build, s3, s3_bucket, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        (src / f"{i}.jpg").write_bytes(scene_jpeg(800 + i, 1300, 1100))
    name = f"s3://{s3_bucket}/built"
    cfg = run_config(tmp_path, src, regions={"method": "none"}, shards={"keep_empty": True}, publish={"to": name}, name="reports")
    dataset = build(cfg, run_id="pub-flow")
    assert dataset["published"]["uri"] == name + "/v1" and dataset["published"]["latest"] == "v1"
    assert [r["key"] for r in pq.read_table(tmp_path / "ds" / "manifest.parquet").to_pylist()] == \
        [s["key"] for s in open_dataset(name, storage=s3, decode=False)]

    # The report went with the version, one page, and the artifact links it by a presigned URL that
    # a browser opens as it is (no credentials), with its thumbnails inside. (moto does not check
    # signatures: S3 refuses a link whose signature or expiry does not hold.)
    report = dataset["publication"]["report"]
    assert report["uri"] == name + "/v1/report.html" and report["expires_at"]
    with urllib.request.urlopen(report["url"], timeout=10) as response:
        page = response.read().decode()
    assert response.status == 200 and "<svg" in page and 'src="thumbs/' not in page
    assert response.headers["Content-Type"] == "text/html"  # shown, not downloaded
    assert page.count('src="data:image/jpeg;base64,') == 2  # the two samples' cards
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(report["url"]).query)  # SigV4, for publish.report_link_hours
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == [str(168 * 3600)]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        links = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["localcap-report-reports"])))
    assert [a.description for a in links if f"({report['url']})" in a.data] == \
        [f"Gallery of samples with boxes and captions, and plots; a presigned S3 link, valid until {report['expires_at']} (publish.report_link_hours)"]


def _other_build(built: Path, dest: Path, tag: str) -> Path:
    """Another build's folder: the same tars under other sample uids (so that it adds samples)."""
    shutil.copytree(built, dest)
    m = pq.read_table(dest / "manifest.parquet")
    m = m.set_column(m.schema.get_field_index("uid"), "uid", [[f"{tag}-{u}" for u in m["uid"].to_pylist()]])
    pq.write_table(m, dest / "manifest.parquet")
    (dest / "hashes.parquet").unlink(missing_ok=True)
    return dest


def test_concurrent_publishers_never_drop_each_others_samples(built, s3, s3_bucket, tmp_path):
    """Four builds published at once to one name on the S3 endpoint: four versions, no gap, the
    newest holding every build's samples (each publisher that lost the race for a number composed
    its snapshot again on top of the winner's)."""
    name = f"s3://{s3_bucket}/raced"
    builds = [_other_build(built, tmp_path / f"b{i}", f"b{i}") for i in range(4)]
    start, results, errors = threading.Barrier(4), [], []

    def publish(folder: Path) -> None:
        start.wait()
        try:
            results.append(publish_version(Storage(endpoint_url=s3.endpoint_url), folder, name, progress=False))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(b,)) for b in builds]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert sorted(r.version for r in results) == ["v1", "v2", "v3", "v4"]
    assert [v.samples for v in list_versions(s3, name)] == [N_IMAGES, 2 * N_IMAGES, 3 * N_IMAGES, 4 * N_IMAGES]
    uids = set(pq.read_table(s3.open_read(f"{name}/v4/manifest.parquet", seekable=True))["uid"].to_pylist())
    assert {u.split("-")[0] for u in uids} == {"b0", "b1", "b2", "b3"} and len(uids) == 4 * N_IMAGES
    assert resolve(s3, name) == f"{name}/v4"


def test_multipart_etag_is_checked(s3, s3_bucket, tmp_path):
    """Files above the part size go up in parts; the ETag computed locally matches S3's."""
    big = tmp_path / "big.bin"
    big.write_bytes(hashlib.sha256(b"x").digest() * (12 * 2**20 // 32))
    assert expected_etag(big, 5 * 2**20).endswith("-3")
    from pipeline.versions import LocalFile, _upload

    f = LocalFile("big.bin", big, big.stat().st_size, "", expected_etag(big, 5 * 2**20))
    _upload(s3, f, f"s3://{s3_bucket}/big.bin", 5 * 2**20, 4)
    assert s3.etag(f"s3://{s3_bucket}/big.bin") == f.etag


def test_dataloader_two_workers_yields_each_sample_once(built):
    from torch.utils.data import DataLoader

    keys = [r["key"] for r in pq.read_table(built / "manifest.parquet").to_pylist()]
    for shuffle in (0, 4):
        ds = open_dataset(str(built), shuffle_buffer=shuffle, decode=False)
        for epoch in range(2):
            ds.set_epoch(epoch)
            # spawn: this test process runs Ray, Prefect's server and moto in threads, which a fork would copy mid-flight
            seen = Counter(s["key"] for s in DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn"))
            assert seen == Counter(keys)


def test_shards_are_dealt_across_nodes_and_workers(built, monkeypatch):
    ds = open_dataset(str(built), decode=False)
    dealt = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dealt += ds.my_shards()
    assert sorted(dealt) == sorted(ds.shards)  # each shard to exactly one node


def test_more_readers_than_shards_deal_samples(built, monkeypatch):
    """4 ranks, 3 shards: no rank idles (an idle DDP rank hangs the others), each sample comes once."""
    ds = open_dataset(str(built), decode=False)
    assert len(ds.shards) < 4
    monkeypatch.setenv("WORLD_SIZE", "4")
    per_rank = []
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        per_rank.append([s["key"] for s in ds])
    assert all(per_rank)
    assert Counter(k for keys in per_rank for k in keys) == Counter(r["key"] for r in pq.read_table(built / "manifest.parquet").to_pylist())


def test_wids_index_describes_the_tars(built):
    for folder in ("image", "text_box"):
        index = json.loads((built / f"wids-{folder}.json").read_text())
        assert index["wids_version"] == 1 and index["__kind__"] == "wids-shard-index-v1"
        sizes = json.loads((built / folder / "sizes.json").read_text())
        assert [(s["url"], s["nsamples"]) for s in index["shardlist"]] == [(f"{folder}/{k}", v) for k, v in sorted(sizes.items())]
        assert all((built / s["url"]).stat().st_size == s["filesize"] for s in index["shardlist"])
        assert sum(s["nsamples"] for s in index["shardlist"]) == N_IMAGES


def test_no_secret_is_logged_or_written(built, s3_endpoint, s3_bucket, tmp_path, monkeypatch, caplog):
    secret = "sEcReT-do-not-write-0f9c2"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage = Storage(endpoint_url=s3_endpoint)  # credentials from the standard chain (here: the environment)
    name = f"s3://{s3_bucket}/secretive"
    with caplog.at_level("DEBUG", logger="localcap"):
        publish_version(storage, built, name, progress=False)
        pull(storage, name, tmp_path / "p", progress=False)
    assert secret not in caplog.text
    objects = storage.s3.list_objects_v2(Bucket=s3_bucket, Prefix="secretive/")["Contents"]
    for obj in objects:
        assert secret.encode() not in storage.s3.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
    for path in (tmp_path / "p").rglob("*"):
        assert path.is_dir() or secret.encode() not in path.read_bytes()


# -- an identical rebuild publishes no new version ---------------------------------------------------
def _rebuild(built: Path, dest: Path) -> Path:
    """The same build run again: tars and descriptors byte-identical, dataset.json with other times."""
    shutil.copytree(built, dest)
    info = json.loads((dest / "dataset.json").read_text())
    (dest / "dataset.json").write_text(json.dumps({**info, "created_at": "2099-01-01T00:00:00Z", "run_id": "again"}))
    assert (dest / "dataset.json").read_bytes() != (built / "dataset.json").read_bytes()
    return dest


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> tuple[Storage, str]:
    """A storage and a dataset name on it: a local folder, or a prefix on the local S3 server."""
    if request.param == "local":
        return Storage(), str(tmp_path / "names" / "scenes")
    s3 = request.getfixturevalue("s3")
    # The bucket is named after the test, cut to 50 characters: parameters may share it.
    return s3, f"s3://{request.getfixturevalue('s3_bucket')}/{tmp_path.name}/scenes"


def _published(storage: Storage, name: str) -> list[str]:
    return [v.version for v in list_versions(storage, name)]


def test_a_rebuild_of_the_same_images_publishes_no_new_version(built, where, tmp_path, caplog):
    storage, name = where
    first = publish_version(storage, built, name, progress=False)
    assert (first.version, first.unchanged) == ("v1", False)
    rebuilt = _rebuild(built, tmp_path / "rebuilt")
    with caplog.at_level("INFO", logger="localcap"):
        again = publish_version(storage, rebuilt, name, progress=False)
    assert (again.version, again.uri, again.unchanged, again.latest) == ("v1", f"{name}/v1", True, "v1")
    assert (again.uploaded, again.bytes_uploaded, again.resumed) == (0, 0, False)
    assert "every sample of the build is in v1 already" in again.reason and again.reason in caplog.text
    assert _published(storage, name) == ["v1"]
    assert not storage.exists(f"{name}/_claims/v2.json") and not storage.exists(f"{name}/v2/dataset.json")
    assert storage.read_bytes(f"{name}/LATEST") == b"v1"


def test_force_publishes_the_same_snapshot_as_a_new_version(built, where, tmp_path):
    storage, name = where
    publish_version(storage, built, name, progress=False)
    forced = publish_version(storage, _rebuild(built, tmp_path / "rebuilt"), name, progress=False, force=True)
    assert (forced.version, forced.latest, forced.unchanged, forced.samples, forced.added) == ("v2", "v2", False, N_IMAGES, 0)
    assert _published(storage, name) == ["v1", "v2"]
    assert publish_version(storage, built, name, progress=False).unchanged  # not forced: nothing new


@pytest.mark.no_ps3_conformance  # v1 is broken on purpose
@pytest.mark.parametrize("listing", [b"{not json", b"[1, 2]", b'{"files": [{"path": "image/image_000000.tar"}]}', None],
                         ids=["not-json", "a-list", "missing-keys", "absent"])
def test_a_broken_newest_version_refuses_the_next_publish_in_one_line(built, where, tmp_path, listing):
    """The next version is built on the newest one: a newest version whose listing is broken cannot
    be (its shards cannot be trusted), so the publish stops, naming the file, and publishes nothing."""
    storage, name = where
    publish_version(storage, built, name, progress=False)
    if listing is None:
        storage.delete(f"{name}/v1/files.json")
    else:
        storage.write_bytes(f"{name}/v1/files.json", listing)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        publish_version(storage, _rebuild(built, tmp_path / "rebuilt"), name, progress=False)
    assert "files.json" in str(err.value) and "\n" not in str(err.value)
    assert _published(storage, name) == ["v1"]


def test_newest_version_is_the_highest_complete_one_when_latest_is_missing(built, tmp_path):
    storage, name = Storage(), str(tmp_path / "names" / "scenes")
    publish_version(storage, built, name, progress=False)
    Path(name, "LATEST").unlink()  # a publisher died before moving it (or it was lost)
    again = publish_version(storage, _rebuild(built, tmp_path / "rebuilt"), name, progress=False)
    assert (again.version, again.unchanged, again.latest) == ("v1", True, "v1")  # LATEST put back first
    Path(name, "LATEST").write_text("../../etc")  # garbage: the highest complete version is compared
    assert publish_version(storage, built, name, progress=False).unchanged


def test_cli_publish_says_unchanged_and_force_publishes(built, tmp_path):
    from flows.cli import app

    name = str(tmp_path / "names" / "scenes")
    rebuilt = _rebuild(built, tmp_path / "rebuilt")
    out = CliRunner().invoke(app, ["publish", str(built), name, "--no-progress"])
    assert out.exit_code == 0 and f"published {name}/v1" in out.output, out.output
    out = CliRunner().invoke(app, ["publish", str(rebuilt), name, "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "unchanged: every sample of the build is in v1 already; no new version (LATEST -> v1)" in out.output
    assert not Path(name, "v2").exists()
    out = CliRunner().invoke(app, ["publish", str(rebuilt), name, "--no-progress", "--force"])
    assert out.exit_code == 0 and f"published {name}/v2" in out.output and "LATEST -> v2" in out.output, out.output
