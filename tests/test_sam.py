"""SAM mask back end: clear errors without weights, and the real code path on a tiny random SAM
(on the CPU here, inside the regions stage's Ray actors; on CUDA in the gpu-marked test)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.preflight import PreflightError

pytest.importorskip("transformers", reason="the `sam` extra is part of the test install")

from pipeline.regions import ProposerUnavailable, preflight
from pipeline.regions.proposers import make_proposer
from pipeline.synthetic import encode, generate_scene
from schemas.config import RegionsSection
from tests.helpers.config import run_config
from tests.helpers.models import build_tiny_sam


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    return str(build_tiny_sam(tmp_path_factory.mktemp("tiny-sam")))


def _cfg(model: str, device: str = "cpu", **sam) -> RegionsSection:
    # A random SAM rates its own masks near 0: thresholds at 0 keep them, so the whole path runs.
    return RegionsSection(masks="sam", min_score=0.0, sam={"model": model, "device": device, "downscale": 384, "points_per_crop": 6,
                                                           "points_per_batch": 16, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, **sam})


def test_missing_weights_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ProposerUnavailable, match="no such directory"):
        preflight(_cfg(str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProposerUnavailable, match="without config.json"):
        preflight(_cfg(str(tmp_path / "empty")))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ProposerUnavailable, match="never downloads"):
        preflight(_cfg("facebook/sam-vit-base"))


def test_cli_reports_missing_weights(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sources: [{{uri: {tmp_path}}}]\nshards: {{output: {tmp_path / 'ds'}}}\nregions: {{masks: sam, sam: {{model: {tmp_path / 'no-sam'}}}}}\n")
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2 and "no such directory" in result.output


def test_tiny_sam_masks_and_boxes_on_cpu(tiny_sam):
    import torch

    from pipeline.regions.sam import SamMasker, box_nms, mask_boxes

    masker = SamMasker(_cfg(tiny_sam))
    pixels = np.asarray(generate_scene(1, 384, 288, n_objects=2)[0])
    masks = masker.masks(pixels)
    assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == (288, 384) and len(masks) >= 1
    weights = masker(pixels, 4.0, 384 * 288 * 4.0)
    assert weights.shape == (288, 384) and np.isfinite(weights).all() and weights.sum() > 0

    img, _ = generate_scene(2, 1600, 1200, n_objects=2)
    p = make_proposer(_cfg(tiny_sam))(encode(img), 1600, 1200)
    assert p.reason is None and 1 <= len(p.boxes) <= 4
    assert (p.boxes[:, 2] <= 1600).all() and (p.boxes[:, 3] <= 1200).all()

    m = torch.zeros(3, 10, 10, dtype=torch.bool)
    m[0, 2:5, 3:7] = True
    m[1, 2:5, 3:6] = True
    assert mask_boxes(m).tolist() == [[3, 2, 7, 5], [3, 2, 6, 5], [0, 0, 0, 0]]
    keep = box_nms(torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]), torch.tensor([0.5, 0.9, 0.1]), 0.7)
    assert keep.tolist() == [1, 2]


def test_sam_runs_in_the_flow_in_ray_actors(tiny_sam, build, tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(encode(generate_scene(40 + i, 1400, 1100, n_objects=2)[0]))
    cfg = run_config(tmp_path, ingest={"partition_size": 2}, regions=_cfg(tiny_sam).model_dump(mode="json"))
    dataset = build(cfg, run_id="sam")
    assert dataset["counts"]["samples"] == 3
    assert dataset["statistics"]["boxes_per_image"]["min"] >= 1


def test_sam_on_cuda_without_gpus_stops_the_flow_before_ingest(tiny_sam, build, tmp_path, ray_local):
    if ray_local.cluster_resources().get("GPU"):
        pytest.skip("this Ray cluster has GPUs")
    cfg = run_config(tmp_path, tmp_path, regions=_cfg(tiny_sam, device="cuda").model_dump(mode="json"))
    with pytest.raises(PreflightError, match="has none"):
        build(cfg, run_id="nogpu")
    assert not (tmp_path / "work").exists()


@pytest.mark.gpu
def test_tiny_sam_on_gpu(tiny_sam):
    img, _ = generate_scene(3, 2048, 1536, n_objects=3)
    p = make_proposer(_cfg(tiny_sam, device="cuda"))(encode(img), 2048, 1536)
    assert p.reason is None and 1 <= len(p.boxes) <= 4
