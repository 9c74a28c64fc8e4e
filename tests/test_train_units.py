"""The trainer's pure parts: targets, crops that move boxes, patch maps, patch gathering and selection,
the low-res context, the losses, retrieval metrics, shard splits and the config."""

from __future__ import annotations

import io
from pathlib import Path
import random

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from pipeline.train.data import box_patch_map, contrastive_example, move_box, pick_target, random_crop
from pipeline.train.evaluate import chance_items, recall
from pipeline.train.loop import lr_factor
from pipeline.train.model import LocalContrastiveModel, gather_patches, select_patches, sigmoid_loss
from pipeline.train.runner import run_name, split_shards
from schemas.train import TrainConfig


def test_pick_target_follows_the_global_probability():
    rng = random.Random(0)
    boxes, caps = [[0, 0, 10, 10], [5, 5, 20, 20]], ["a red sign", "a blue door"]
    picks = [pick_target(boxes, caps, "a street", 0.25, rng) for _ in range(2000)]
    share = sum(t.box is None for t in picks) / len(picks)
    assert 0.2 < share < 0.3
    assert {t.text for t in picks if t.box is not None} == set(caps)
    assert all(t.text == "a street" for t in picks if t.box is None)
    assert pick_target([], [], "a street", 0.0, rng).box is None  # no box: the global caption
    assert pick_target(boxes, ["", ""], None, 0.5, rng) is None  # nothing to contrast
    assert pick_target(boxes, caps, None, 1.0, rng).box is not None  # no global caption: a box


def test_crop_moves_boxes_with_the_image():
    crop = (100.0, 50.0, 500.0, 350.0)  # 400 x 300 -> resized to 200 x 150: scale 0.5
    assert move_box((150, 100, 250, 200), crop, 200, 150) == (25.0, 25.0, 75.0, 75.0)
    assert move_box((0, 0, 120, 60), crop, 200, 150) == (0.0, 0.0, 10.0, 5.0)  # clipped to the crop
    assert move_box((0, 0, 90, 40), crop, 200, 150) is None
    rng = random.Random(1)
    for _ in range(50):
        x1, y1, x2, y2 = random_crop(1000, 600, (0.9, 1.0), rng)
        area = (x2 - x1) * (y2 - y1) / 600000
        assert 0.9 - 1e-9 <= area <= 1.0 and 0 <= x1 and x2 <= 1000 and 0 <= y1 and y2 <= 600
        assert (x2 - x1) / (y2 - y1) == pytest.approx(1000 / 600)


def test_box_patch_map_takes_patches_whose_centres_are_inside():
    m = box_patch_map((16, 16, 48, 39), side=64, patch=16)  # centres 8, 24, 40, 56
    assert m.shape == (4, 4)
    assert m.nonzero()[0].tolist() == [1, 1] and m.nonzero()[1].tolist() == [1, 2]
    tiny = box_patch_map((33, 2, 35, 4), side=64, patch=16)
    assert tiny.sum() == 1 and tiny[0, 2]


def test_example_box_map_lands_on_the_object_after_the_crop():
    """A red square at a known place: after a random crop and resize, the map's patches are red."""
    img = Image.new("RGB", (1600, 1200), (128, 128, 128))
    img.paste((230, 20, 20), (800, 400, 1120, 720))
    data = io.BytesIO()
    img.save(data, "JPEG", quality=95)
    sample = {"key": "k", "image": data.getvalue(), "boxes": [[800, 400, 1120, 720]], "captions": ["a red square"],
              "global_caption": "a grey wall"}
    rng = random.Random(3)
    for _ in range(5):
        ex = contrastive_example(sample, 64, 256, 16, 0.0, (0.9, 1.0), rng)
        assert not ex["is_global"] and ex["text"] == "a red square"
        assert ex["high"].shape == (3, 256, 256) and ex["low"].shape == (3, 64, 64)
        red = (ex["high"][0] > 0.5) & (ex["high"][1] < -0.5)  # in [-1, 1]
        centres_red = red[8::16, 8::16]
        all_red = red.reshape(16, 16, 16, 16).mean(axis=(1, 3)) > 0.95
        assert ex["box_map"].sum() >= 4
        assert centres_red[ex["box_map"]].mean() >= 0.9  # the mapped patches sit on the square
        assert ex["box_map"][all_red].all()  # and every patch wholly inside it is mapped
    glob = contrastive_example(sample, 64, 256, 16, 1.0, (1.0, 1.0), rng)
    assert glob["is_global"] and glob["text"] == "a grey wall" and not glob["box_map"].any()


def test_gather_patches_matches_the_patch_embedding_conv():
    img = torch.randn(2, 3, 64, 96)
    index = torch.tensor([[0, 5, 13], [23, 7, 1]])
    conv = torch.nn.Conv2d(3, 8, 16, 16)
    by_conv = conv(img).flatten(2).transpose(1, 2).gather(1, index[..., None].expand(-1, -1, 8))
    by_gather = gather_patches(img, index, 16) @ conv.weight.flatten(1).t() + conv.bias
    assert torch.allclose(by_gather, by_conv, atol=1e-5)


def test_selection_takes_the_box_first_then_the_best_scores():
    score = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    box = torch.tensor([[False, False, False, True, True, False]])
    assert sorted(select_patches(score, box, 3)[0].tolist()) == [0, 3, 4]
    assert sorted(select_patches(score, None, 2)[0].tolist()) == [0, 1]


def _tiny(**update):
    opts = TrainConfig(preset="tiny").model_options().model_copy(update=update)
    torch.manual_seed(0)
    return LocalContrastiveModel(opts, 400).eval()


@pytest.mark.parametrize("context", [True, False])
def test_high_res_tokens_see_the_low_res_view_only_with_the_context(context):
    model = _tiny(low_res_context=context)
    high, index = torch.randn(1, 3, 256, 256), torch.arange(48)[None]
    with torch.no_grad():
        outs = [model.encode_high(high, index, model.encode_low(torch.randn(1, 3, 64, 64))[1]) for _ in range(2)]
    assert torch.allclose(outs[0], outs[1]) != context


def test_step_cost_does_not_depend_on_the_high_res_side():
    """The selected tokens, not the pixels, set the work: 2x the side, the same token count."""
    model = _tiny()
    for side in (256, 512):
        high = torch.randn(1, 3, side, side)
        low_feats, ctx = model.encode_low(torch.randn(1, 3, 64, 64))
        bottom_up, top_down = model.selection_logits(low_feats, torch.zeros(1, 64), side // 16)
        assert bottom_up.shape == (1, (side // 16) ** 2)
        index = select_patches(bottom_up + top_down, None, model.opts.patch_budget)
        assert model.encode_high(high, index, ctx).shape == (1, 48, 64)


def test_sigmoid_loss_counts_equal_captions_as_positives():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    scale, bias = torch.tensor(np.log(10.0)), torch.tensor(-5.0)
    assert sigmoid_loss(emb, emb, same, scale, bias) < sigmoid_loss(emb, emb, torch.eye(3, dtype=torch.bool), scale, bias)


def test_model_forward_gives_both_losses_and_gradients_everywhere():
    model = _tiny().train()
    box = torch.zeros(2, 16, 16, dtype=torch.bool)
    box[:, 2:6, 3:7] = True
    out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 256, 256), box, torch.tensor([False, True]), torch.randint(3, 400, (2, 16)))
    (out["contrastive"] + out["selection"]).backward()
    assert out["contrastive"] > 0 and out["selection"] > 0
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_recall_and_chance():
    items = torch.eye(3)
    texts = torch.eye(3)
    m = recall(items, ["a", "b", "c"], texts, ["a", "b", "c"], "region", "caption", ks=(1,))
    assert m["region_to_caption_r1"] == 1.0 and m["caption_to_region_r1"] == 1.0
    assert m["region_to_caption_r1_chance"] == pytest.approx(1 / 3)
    shuffled = recall(items, ["b", "c", "a"], texts, ["a", "b", "c"], "region", "caption", ks=(1,))
    assert shuffled["region_to_caption_r1"] == 0.0
    assert chance_items(["a", "a", "b", "c"], 1) == pytest.approx((0.5 + 0.25 + 0.25) / 3)


def test_lr_warms_up_then_decays_to_zero():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)


def test_shard_split_holds_out_the_last_shards():
    assert split_shards(8, 2) == ((0, 6), (6, 8), False)
    assert split_shards(1, 1) == ((0, 1), (0, 1), True)  # too few: evaluate on the training shards, flagged
    assert split_shards(3, 0) == ((0, 3), (0, 3), True)
    with pytest.raises(ValueError):
        split_shards(0, 1)
    assert run_name("s3://bucket/datasets/streets/v3", "mae") == "streets-v3-mae"


def test_train_config_checks_sizes_and_presets():
    tiny = TrainConfig(preset="tiny").model_options()
    assert (tiny.high_res, tiny.patch_budget, tiny.hidden_size) == (256, 48, 64)
    with pytest.raises(ValidationError, match="multiple of patch_size"):
        TrainConfig(model={"high_res": 1000, "patch_size": 16})
    with pytest.raises(ValidationError, match="crop_scale"):
        TrainConfig(data={"crop_scale": (0.5, 1.2)})
    with pytest.raises(ValidationError):
        TrainConfig(objective="clip")


def test_one_worker_runs_on_a_ray_task_and_ddp_on_ray_train():
    from pipeline.train.runner import on_task

    assert on_task(TrainConfig(num_workers=1)) and not on_task(TrainConfig(num_workers=2))


def test_latest_checkpoint_is_the_newest_whole_one(tmp_path):
    """What a rerun resumes from when Ray's own record of checkpoints lags behind the uploads."""
    import json as _json

    from pipeline.storage import Storage
    from pipeline.train.checkpoints import latest_checkpoint

    for name, step, whole in (("checkpoint_a", 10, True), ("checkpoint_b", 30, False), ("checkpoint_c", 20, True)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train.json").write_text(_json.dumps({"step": step}))
        if whole:
            (folder / "state.pt").write_bytes(b"x")
    (tmp_path / "tokenizer_dir").mkdir()
    assert latest_checkpoint(Storage(), str(tmp_path)) == (str(tmp_path / "checkpoint_c"), 20)
    assert latest_checkpoint(Storage(), str(tmp_path / "missing")) is None


def test_saved_checkpoints_keep_the_newest_and_read_back(tmp_path, s3_endpoint, s3_bucket):
    """A single-worker run's own checkpoints (on a Ray task), locally and on S3: train.json last,
    only `keep` whole ones left, each readable as a local folder."""
    import json as _json

    from pipeline.storage import Storage
    from pipeline.train.checkpoints import StoredCheckpoint, latest_checkpoint, save_checkpoint

    for run_dir, storage in ((str(tmp_path / "run"), Storage()), (f"s3://{s3_bucket}/units/run", Storage(s3_endpoint))):
        saved = []
        for step in (5, 10, 15):
            folder = tmp_path / f"state-{step}"
            folder.mkdir(exist_ok=True)
            (folder / "state.pt").write_bytes(b"s" * step)
            (folder / "train.json").write_text(_json.dumps({"step": step}))
            saved.append(save_checkpoint(storage, run_dir, str(folder), keep=2))
        assert storage.list_dirs(run_dir) == sorted(u.rsplit("/", 1)[1] for u in saved[1:])  # the oldest is gone, folder and all
        assert latest_checkpoint(storage, run_dir) == (saved[2], 15)
        with StoredCheckpoint(storage, saved[2]).as_directory() as local:
            assert (Path(local) / "state.pt").read_bytes() == b"s" * 15


def test_positions_at_selected_patches_equal_siglips_interpolated_table():
    """Sampling the learned grid at the selected patches only gives SigLIP's own bicubic
    interpolation of the whole table to the high-res grid (at a cost independent of that grid)."""
    model = _tiny()
    emb = model.vision.embeddings
    weight = emb.position_embedding.weight
    for side in (256, 512):
        n = (side // 16) ** 2
        full = emb.interpolate_pos_encoding(weight.new_empty(1, 1, weight.shape[1]).expand(1, n, -1), side, side)[0]
        index = torch.randperm(n)[:40].reshape(2, 20)
        assert torch.allclose(model.positions_at(index, side), full[index], atol=1e-5)


def test_recall_keys_are_the_recall_figures_only():
    from pipeline.train.evaluate import recall_keys

    metrics = {"steps_this_run": 20, "eval_regions": 31, "resumed_from": None, "region_to_caption_r1": 0.8,
               "region_to_caption_r1_chance": 0.1, "caption_to_region_r5": 1.0, "caption_to_region_r5_chance": 0.5}
    assert recall_keys(metrics) == ["caption_to_region_r5", "region_to_caption_r1"]
