"""The per-worker training loop, run on every DDP rank by Ray Train or alone on one Ray task (its
session, session.py, says which; runner.py does the wiring).

Each rank streams its share of the training shards (the loader deals shards across ranks and
DataLoader workers), runs `steps` optimizer steps in all, reports a checkpoint every
`checkpoint_every` steps (rank 0 writes it) and, on rank 0, evaluates on the held-out shards at the
end. A restarted run gets its last checkpoint from its session and continues the step counter.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from itertools import count, islice

import numpy as np
import torch

from pipeline.shards.loader import ShardDataset
from pipeline.train.checkpoints import STATE, TRAIN_JSON
from pipeline.train.data import contrastive_example, eval_view, mae_example
from pipeline.train.text import encode, load_tokenizer
from schemas.train import TrainConfig


class TrainStream(torch.utils.data.IterableDataset):
    """Endless examples from this reader's share of the training shards, epoch after epoch."""

    def __init__(self, dataset: ShardDataset, cfg: TrainConfig, seed: int):
        self.dataset, self.cfg, self.seed = dataset, cfg, seed

    def __iter__(self):
        cfg, opts = self.cfg, self.cfg.model_options()
        worker = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}/{worker.id if worker else 0}")
        for epoch in count():
            self.dataset.set_epoch(epoch)
            made = 0
            for sample in self.dataset:
                if cfg.objective == "mae":
                    example = mae_example(sample, cfg.mae_options().image_size, cfg.data.crop_scale, rng)
                else:
                    example = contrastive_example(sample, opts.low_res, opts.high_res, opts.patch_size,
                                                  cfg.data.global_caption_prob, cfg.data.crop_scale, rng)
                if example is not None:
                    made += 1
                    yield example
            if not made:  # an endless loop over nothing would hang this rank and, through DDP, all others
                raise ValueError(f"no trainable sample in this reader's share of {self.dataset.root} "
                                 f"({'no image' if cfg.objective == 'mae' else 'no captioned box or global caption'})")


class Collate:
    """Stacks arrays and tokenizes captions (in the DataLoader worker, off the training thread)."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, examples: list[dict]) -> dict:
        batch = {"keys": [e["key"] for e in examples]}
        if "pixels" in examples[0]:
            batch["pixels"] = torch.from_numpy(np.stack([e["pixels"] for e in examples]))
            return batch
        batch["low"] = torch.from_numpy(np.stack([e["low"] for e in examples]))
        batch["high"] = torch.from_numpy(np.stack([e["high"] for e in examples]))
        batch["box_map"] = torch.from_numpy(np.stack([e["box_map"] for e in examples]))
        batch["is_global"] = torch.tensor([e["is_global"] for e in examples])
        batch["input_ids"] = encode(self.tokenizer, [e["text"] for e in examples], self.max_len)
        return batch


def build_model(cfg: TrainConfig, tokenizer):
    from pipeline.train.model import LocalContrastiveModel, build_mae

    opts = cfg.model_options()
    if cfg.objective == "mae":
        return build_mae(opts, cfg.mae_options())
    return LocalContrastiveModel(opts, len(tokenizer), tokenizer.pad_token_id or 0,
                                 tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _gather(tensor: torch.Tensor, with_grad: bool) -> torch.Tensor:
    import torch.distributed as dist

    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor))
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def step_loss(model, batch: dict, cfg: TrainConfig, device, distributed: bool) -> tuple[torch.Tensor, dict]:
    if cfg.objective == "mae":
        loss = model(pixel_values=batch["pixels"].to(device)).loss
        return loss, {"loss": loss.item()}
    parts = model(batch["low"].to(device), batch["high"].to(device), batch["box_map"].to(device), batch["is_global"].to(device),
                  batch["input_ids"].to(device), gather=_gather if distributed else None)
    loss = parts["contrastive"] + cfg.selection_loss_weight * parts["selection"]
    return loss, {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}


def _unwrap(model):
    return getattr(model, "module", model)


def save_state(folder: str, model, optimizer, step: int, cfg: TrainConfig, tokenizer_json: str | None, history: list) -> None:
    torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": step}, os.path.join(folder, STATE))
    with open(os.path.join(folder, TRAIN_JSON), "w") as f:
        json.dump({"step": step, "config": cfg.model_dump(mode="json"), "history": history}, f, indent=1)
    if tokenizer_json:
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            f.write(tokenizer_json)


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, dataset: ShardDataset, tokenizer, device) -> dict:
    """Held-out metrics: retrieval for local_contrastive, the masked reconstruction loss for mae."""
    from pipeline.train.evaluate import retrieval_metrics

    model = _unwrap(model)
    model.eval()
    samples = islice(iter(dataset), cfg.eval.max_images)
    if cfg.objective == "mae":
        torch.manual_seed(cfg.seed)  # the same masks for every evaluation
        rng, losses = random.Random(cfg.seed), []
        for sample in samples:
            pixels = torch.from_numpy(mae_example(sample, cfg.mae_options().image_size, (1.0, 1.0), rng)["pixels"])[None].to(device)
            losses.append(model(pixel_values=pixels).loss.item())
        return {"eval_images": len(losses), "eval_loss": float(np.mean(losses)) if losses else None}
    opts = cfg.model_options()
    views = [eval_view(s, opts.low_res, opts.high_res, opts.patch_size) for s in samples]

    def encode_texts(texts: list[str]) -> torch.Tensor:
        return torch.cat([model.encode_text(encode(tokenizer, texts[i:i + 256], model.max_text_len).to(device)).float().cpu()
                          for i in range(0, len(texts), 256)])

    return retrieval_metrics(model, views, encode_texts, cfg.eval.batch_size, device)


def progress(loop_config: dict, line: str) -> None:
    """A progress line on the worker's stdout and, when the driver listens (run_training's
    on_progress), into its queue: the driver logs it where the run is watched (Prefect's logs)."""
    print(line, flush=True)
    queue = loop_config.get("progress")
    if queue is not None:
        try:
            queue.put_nowait(line)
        except Exception:  # a full or lost queue must not stop training
            pass


def train_worker(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    from pipeline.train.session import RayTrainSession

    train_loop(loop_config, RayTrainSession(loop_config.get("found_checkpoint")))


def train_task(loop_config: dict) -> tuple[dict, str | None]:
    """The whole run on one Ray task (runner.run_on_task): (the last report's metrics, its checkpoint's URI)."""
    from pipeline.train.session import TaskSession

    cfg = TrainConfig.model_validate(loop_config["train"])
    session = TaskSession(loop_config["storage"], loop_config["run_dir"], cfg.keep_checkpoints,
                          loop_config.get("found_checkpoint"), cfg.use_gpu)
    train_loop(loop_config, session)
    return session.metrics, session.checkpoint


def train_loop(loop_config: dict, session) -> None:
    """`steps` optimizer steps from the session's newest loadable checkpoint, checkpoints every
    `checkpoint_every`, then (rank 0) the held-out metrics and the probe, reported with the last one."""
    cfg = TrainConfig.model_validate(loop_config["train"])
    storage, root = loop_config["storage"], loop_config["dataset"]
    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(cfg.seed)
    tokenizer = None if cfg.objective == "mae" else load_tokenizer(loop_config.get("tokenizer_json"), loop_config.get("tokenizer_path"))
    model = build_model(cfg, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, resumed_from = 0, None
    state, history = _resume_state(session.checkpoints)
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = resumed_from = state["step"]
        if rank == 0:
            progress(loop_config, f"resumed from the checkpoint at step {step}")
    elif loop_config.get("init_checkpoint"):
        _init_weights(model, loop_config["init_checkpoint"], storage)
        if rank == 0:
            progress(loop_config, f"fine-tuning from {loop_config['init_checkpoint']}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps), last_epoch=step - 1)
    model = session.prepare(model)

    train_set = ShardDataset(root, cfg.data.shuffle_buffer, cfg.seed + step, decode=False, storage=storage,
                             shards=range(*loop_config["train_shards"]), max_samples=cfg.data.max_images)
    loader = torch.utils.data.DataLoader(
        TrainStream(train_set, cfg, cfg.seed + 7919 * rank + step), batch_size=cfg.batch_size,
        num_workers=cfg.data.loader_workers, collate_fn=Collate(tokenizer, getattr(_unwrap(model), "max_text_len", 0)),
        multiprocessing_context="spawn" if cfg.data.loader_workers else None, persistent_workers=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    batches = iter(loader)
    model.train()
    started, images = time.perf_counter(), 0
    while step < cfg.steps:
        batch = next(batches)
        with autocast:
            loss, parts = step_loss(model, batch, cfg, device, world > 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        images += len(batch["keys"]) * world
        parts |= {"step": step, "lr": scheduler.get_last_lr()[0], "images_per_s": images / (time.perf_counter() - started)}
        history.append({k: round(v, 5) if isinstance(v, float) else v for k, v in parts.items()})
        del history[:-2000]  # the checkpoint keeps the recent loss curve, not all of it
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            _report(session, parts | {"resumed_from": resumed_from}, model, optimizer, step, cfg, loop_config, history)
        elif rank == 0 and (step % 10 == 0 or step == 1):
            progress(loop_config, f"step {step}/{cfg.steps} loss {parts['loss']:.4f} ({parts['images_per_s']:.1f} images/s)")

    # The last checkpoint carries the held-out metrics (the run's result is the last checkpoint's report).
    metrics = {"step": step, "resumed_from": resumed_from, "steps_this_run": step - (resumed_from or 0),
               "first_loss": _mean_loss(history[:5]), "last_loss": _mean_loss(history[-5:]),
               "params": sum(p.numel() for p in _unwrap(model).parameters())}
    if rank == 0:
        eval_set = ShardDataset(root, 0, cfg.seed, decode=False, storage=storage, shards=range(*loop_config["eval_shards"]), split=False)
        metrics |= evaluate(model, cfg, eval_set, tokenizer, device)
        if cfg.probe is not None:
            from pipeline.train.probe import probe_metrics

            torch.manual_seed(cfg.seed)  # the weights this run started from (as built above): what training added
            untrained = build_model(cfg, tokenizer).to(device)
            metrics |= probe_metrics({"": _unwrap(model), "_init": untrained}, cfg, iter(eval_set), device)
        progress(loop_config, "eval: " + json.dumps(metrics))
    _report(session, metrics, model, optimizer, step, cfg, loop_config, history)


def _load_checkpoint(checkpoint) -> tuple[dict, list]:
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE), map_location="cpu", weights_only=True)
        with open(os.path.join(folder, TRAIN_JSON)) as f:
            history = json.load(f).get("history", [])
    return state, history


def _init_weights(model, uri: str, storage) -> None:
    """A fine-tune's start: the weights (not the optimizer, nor the step) of another run's checkpoint."""
    from pipeline.train.checkpoints import StoredCheckpoint

    state, _ = _load_checkpoint(StoredCheckpoint(storage, uri))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"train.start previous_version: {uri} holds a model of other sizes than this run's "
                         f"({str(exc).splitlines()[0][:200]}); train this version with start: scratch") from None


def _resume_state(checkpoints: list) -> tuple[dict | None, list]:
    """The newest loadable state among the session's checkpoints; (None, []) to start afresh."""
    best, history = None, []
    for checkpoint in checkpoints:
        try:
            state, rows = _load_checkpoint(checkpoint)
        except Exception as exc:  # a checkpoint cut short by the kill: try the other one
            print(f"checkpoint {checkpoint} not loadable ({type(exc).__name__}: {exc}); skipped", flush=True)
            continue
        if best is None or state["step"] > best["step"]:
            best, history = state, rows
    return best, history


def _mean_loss(rows: list[dict]) -> float | None:
    return float(np.mean([r["loss"] for r in rows])) if rows else None


def _report(session, metrics: dict, model, optimizer, step: int, cfg: TrainConfig, loop_config: dict, history: list) -> None:
    """Every rank reports; rank 0 attaches the checkpoint."""
    if session.rank != 0:
        session.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_state(folder, model, optimizer, step, cfg, loop_config.get("tokenizer_json"), history)
        session.report(metrics, folder)
    loss = metrics.get("loss", metrics.get("last_loss"))
    progress(loop_config, f"step {step}/{cfg.steps}" + (f" loss {loss:.4f}" if loss is not None else "") + ": checkpoint saved")
