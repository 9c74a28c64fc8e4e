"""Shards as PS3's trainer reads them: image and text_box tars in lockstep, keys equal everywhere."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.dataset_format import TAR_END, member_size
from pipeline.shards.plan import SampleRef, assign_shards
from pipeline.shards.writer import tar_bytes_into
from schemas.sample import TextBoxSample, validate_sample_json
from tests.helpers.config import run_config
from tests.helpers.images import scene_jpeg


@pytest.fixture(scope="module")
def paired_dataset(ray_local, prefect_harness, tmp_path_factory):
    from flows.build import build_dataset

    root = tmp_path_factory.mktemp("paired")
    (root / "img").mkdir()
    for i in range(7):
        (root / "img" / f"{i:02d}.jpg").write_bytes(scene_jpeg(100 + i, 1300 + 40 * i, 1100))
    (root / "img" / "junk.jpg").write_bytes(b"junk")
    cfg = run_config(root, ingest={"partition_size": 3}, shards={"max_samples": 3})
    dataset = build_dataset(cfg, run_id="paired", progress=False)
    return root, dataset


def _urls(ds, folder):
    sizes = json.loads((ds / folder / "sizes.json").read_text())
    return [str(ds / folder / name) for name in sorted(sizes)], sizes


def test_ps3_lockstep_read(paired_dataset):
    root, dataset = paired_dataset
    ds = root / "ds"
    image_urls, image_sizes = _urls(ds, "image")
    text_urls, text_sizes = _urls(ds, "text_box")
    assert len(image_urls) == 3 and list(image_sizes.values()) == [3, 3, 1]
    assert list(text_sizes.values()) == list(image_sizes.values())

    images = wds.WebDataset(image_urls, shardshuffle=False, empty_check=False)
    texts = wds.WebDataset(text_urls, shardshuffle=False, empty_check=False)
    manifest = pq.read_table(ds / "manifest.parquet").to_pylist()
    n = 0
    for img, txt, row in zip(images, texts, manifest, strict=True):
        assert img["__key__"] == txt["__key__"] == row["key"]
        assert set(row["key"]) <= set("0123456789abcdef")
        sample = validate_sample_json(txt["json"])
        sample.check_inside(row["width"], row["height"])
        # Boxes from the regions stage; no captioner ran, so every text is "" and nothing is invented.
        assert len(sample.box) == row["boxes"] > 0 and sample.text == [""] * row["boxes"] and sample.global_text is None
        pil = Image.open(io.BytesIO(img["jpg"])).convert("RGB")
        assert pil.size == (row["width"], row["height"])
        n += 1
    assert n == sum(image_sizes.values()) == dataset["counts"]["samples"] == 7


def test_tar_members_are_in_the_same_order(paired_dataset):
    ds = paired_dataset[0] / "ds"
    for name in json.loads((ds / "image" / "sizes.json").read_text()):
        with tarfile.open(ds / "image" / name) as a, tarfile.open(ds / "text_box" / name.replace("image", "text_box")) as b:
            ka = [m.name.split(".")[0] for m in a.getmembers()]
            kb = [m.name.split(".")[0] for m in b.getmembers()]
            assert ka == kb and len(set(ka)) == len(ka)
            assert all(m.mtime == 0 and m.uid == 0 for m in a.getmembers())


def test_dataset_json_written_with_counts(paired_dataset):
    root, dataset = paired_dataset
    on_disk = json.loads((root / "ds" / "dataset.json").read_text())
    assert on_disk["counts"] == {"inputs": 8, "samples": 7, "rejected": 1, "rejected_by_reason": {"not_an_image": 1}, "shards": 3}
    assert on_disk["versions"]["localcap"] and on_disk["config"]["shards"]["max_samples"] == 3
    run = json.loads((root / "work" / "paired" / "run.json").read_text())
    assert [s["stage"] for s in run["stages"]] == ["ingest", "dedupe", "regions", "caption", "shard"]


def test_iter_paired_reader(paired_dataset):
    from pipeline.shards.reader import iter_paired

    samples = list(iter_paired(str(paired_dataset[0] / "ds")))
    assert len(samples) == 7 and all(isinstance(s, TextBoxSample) for _, _, s in samples)


def test_iter_paired_detects_mismatch(paired_dataset, tmp_path):
    import shutil

    from pipeline.shards.reader import PairingError, iter_paired

    ds = tmp_path / "broken"
    shutil.copytree(paired_dataset[0] / "ds", ds)
    tb = ds / "text_box" / "text_box_000000.tar"
    with tarfile.open(tb) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with open(tb, "wb") as f:
        tar_bytes_into(f, list(reversed(members)))
    with pytest.raises(PairingError, match="position 0"):
        list(iter_paired(str(ds)))


def test_combined_layout(build, tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(scene_jpeg(200 + i))
    cfg = run_config(tmp_path, shards={"layout": "combined"})
    build(cfg, run_id="combined")
    urls = [str(tmp_path / "ds" / "combined" / "shard_000000.tar")]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == 3 and all("jpg" in s and "json" in s for s in samples)
    assert json.loads((tmp_path / "ds" / "combined" / "sizes.json").read_text()) == {"shard_000000.tar": 3}


def test_assign_shards_by_count_and_bytes():
    refs = [SampleRef(f"{i:02x}", 0, i, 1000) for i in range(10)]
    assert [len(s) for s in assign_shards(refs, max_samples=4, max_bytes=10**9, combined=False)] == [4, 4, 2]
    limit = TAR_END + 3 * member_size(1000)
    assert [len(s) for s in assign_shards(refs, max_samples=100, max_bytes=limit, combined=False)] == [3, 3, 3, 1]
    huge = [SampleRef("ff", 0, 0, 10**6)]
    assert [len(s) for s in assign_shards(huge, 100, 1000, False)] == [1]  # never dropped


def test_byte_limit_matches_real_tar_size():
    data = [(f"{i:032x}.jpg", bytes(range(256)) * (7 + i)) for i in range(5)]
    buf = io.BytesIO()
    tar_bytes_into(buf, data)
    planned = TAR_END + sum(member_size(len(d)) for _, d in data)
    assert planned - 10240 < len(buf.getvalue()) <= planned


def test_tar_writer_is_deterministic():
    data = [("a.jpg", b"x" * 700), ("a.json", b"{}")]
    one, two = io.BytesIO(), io.BytesIO()
    tar_bytes_into(one, data)
    tar_bytes_into(two, data)
    assert one.getvalue() == two.getvalue()


def test_sample_validator():
    ok = TextBoxSample(text=["a red sign"], box=[[1, 2, 30, 40]], global_text="g", type="document")
    assert validate_sample_json(ok.to_json_bytes()) == ok
    with pytest.raises(ValueError, match="1 texts for 0 boxes"):
        TextBoxSample(text=["x"], box=[])
    with pytest.raises(ValueError, match="x1 < x2"):
        TextBoxSample(text=["x"], box=[[5, 0, 5, 9]])
    with pytest.raises(ValueError):
        validate_sample_json(b'{"text": [], "box": [], "extra": 1}')
    with pytest.raises(ValueError, match="leaves"):
        ok.check_inside(20, 20)


def test_flow_leaves_markdown_artifact(paired_dataset):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["localcap-build-localcap"])))
    text = next(a.data for a in artifacts if "`paired`" in a.data)
    assert "**7** samples in **3** shards from **8** inputs" in text
    assert "| ingest | 3 | 3 | 0 |" in text and "| not_an_image | 1 |" in text
    # What the build made, readable in the UI: its first samples, and where the HTML report is.
    assert "| sample | boxes | box captions | global caption |" in text and text.count("\n| `") == 5
    assert "HTML report" in text and "index.html" in text
