"""Ray wiring around the loop: split the dataset, settle the tokenizer, run the loop, write metrics.

A run with more than one worker is Ray Train's TorchTrainer (DDP ranks, its controller and worker
actors); a single-worker run is one Ray task: the same loop without the several seconds Ray Train
takes to start and stop its actors. Checkpoints go to OUTPUT/NAME/ (a path
or s3://) either way; rerunning the same name on the same output finds them there (checkpoints.py)
and resumes from the last one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.shards.loader import ShardDataset
from pipeline.storage import Storage, is_s3, join
from pipeline.dataset_format import version_name, version_number
from pipeline.train.checkpoints import latest_checkpoint
from pipeline.train.text import iter_captions, train_tokenizer
from schemas.train import TrainConfig

log = logging.getLogger(__name__)
TOKENIZER = "tokenizer.json"
METRICS = "metrics.json"


@dataclass
class TrainResult:
    name: str
    output: str  # OUTPUT/NAME
    dataset: str  # the resolved dataset directory
    checkpoint: str | None
    metrics: dict


def run_name(dataset_root: str, objective: str) -> str:
    """A default run name from the dataset's last two path parts (NAME/vN) and the objective."""
    parts = [p for p in re.split(r"[/:]+", dataset_root) if p][-2:]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts + [objective])).strip("-")


def split_shards(n_shards: int, holdout: int) -> tuple[tuple[int, int], tuple[int, int], bool]:
    """(train range, eval range, evaluated on training data): the last `holdout` shards are held
    out; a dataset with too few shards is trained and evaluated on all of them (and says so)."""
    if n_shards == 0:
        raise ValueError("the dataset has no shards")
    if holdout and n_shards > holdout:
        return (0, n_shards - holdout), (n_shards - holdout, n_shards), False
    return (0, n_shards), (0, n_shards), True


def training_images(dataset: ShardDataset, holdout: int) -> int:
    """Samples in the shards a run trains on: all but the last `holdout` (split_shards)."""
    train_range, _, _ = split_shards(len(dataset.shards), holdout)
    return sum(dataset.sizes[s] for s in dataset.shards[slice(*train_range)])


def earlier_version_checkpoint(storage: Storage, dataset_root: str, cfg: TrainConfig) -> str | None:
    """train.start previous_version: the newest whole checkpoint of the run (default name, same
    output and objective) that trained on the nearest earlier version of NAME/vN; None when the
    dataset is not a published version or no earlier version was trained on."""
    name_uri, _, version = dataset_root.rstrip("/").rpartition("/")
    n = version_number(version)
    for earlier in range((n or 1) - 1, 0, -1):
        found = latest_checkpoint(storage, join(cfg.output, run_name(join(name_uri, version_name(earlier)), cfg.objective)))
        if found:
            return found[0]
    return None


def settle_tokenizer(cfg: TrainConfig, dataset: ShardDataset, train_shards: list[str], storage: Storage, output: str,
                     init_checkpoint: str | None = None) -> dict:
    """Where workers get their tokenizer: the pretrained model's or a given directory, else the one
    of the checkpoint a fine-tune starts from (its weights fit that vocabulary), else one trained on
    the training shards' captions; kept in OUTPUT/NAME so that a resumed run reuses it."""
    if cfg.objective == "mae":
        return {"tokenizer_json": None, "tokenizer_path": None}
    path = cfg.tokenizer or cfg.model_options().pretrained
    if path:
        return {"tokenizer_json": None, "tokenizer_path": path}
    uri = join(output, TOKENIZER)
    if storage.exists(uri):
        return {"tokenizer_json": storage.read_bytes(uri).decode(), "tokenizer_path": None}
    if init_checkpoint and storage.exists(join(init_checkpoint, TOKENIZER)):
        text = storage.read_bytes(join(init_checkpoint, TOKENIZER)).decode()
    else:
        text = train_tokenizer(iter_captions(dataset, train_shards), cfg.model_options().vocab_size)
    storage.write_bytes(uri, text.encode())
    return {"tokenizer_json": text, "tokenizer_path": None}


def ray_storage(output: str, storage: Storage):
    """(storage_path, storage_filesystem) for Ray Train: S3 through pyarrow with our endpoint."""
    if not is_s3(output):
        return os.path.abspath(output), None
    from pyarrow import fs

    endpoint = storage.resolved_endpoint()
    kwargs = {"region": storage.resolved_region()}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs |= {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    return output[len("s3://"):], fs.S3FileSystem(**kwargs)


def while_reporting(run: Callable[[], object], queue, on_progress: Callable[[str], None] | None):
    """run(), handing the workers' progress lines to `on_progress` while it runs: the Ray queue
    they put into (loop_config["progress"]) drained by a thread here."""
    if queue is None or on_progress is None:
        return run()
    from ray.util.queue import Empty

    done = threading.Event()

    def drain(block: bool) -> None:
        while True:
            try:
                on_progress(queue.get(block=block, timeout=0.5))
            except Empty:
                return

    def listen() -> None:
        while not done.is_set():
            drain(block=True)

    listener = threading.Thread(target=listen, name="train-progress", daemon=True)
    listener.start()
    try:
        return run()
    finally:
        done.set()
        listener.join(timeout=5)
        drain(block=False)
        queue.shutdown()


def on_task(cfg: TrainConfig) -> bool:
    """Whether this run goes on one Ray task: a single worker needs none of Ray Train's controller and
    worker actors (seconds to start), only a process with its resources; DDP ranks need Ray Train."""
    return cfg.num_workers == 1


def run_on_task(loop_config: dict, cfg: TrainConfig, storage: Storage, output: str) -> tuple[dict, str | None]:
    """The loop on one Ray task with the worker's resources; a failed attempt (an error, or the
    task's process killed) is retried from the run's newest checkpoint up to max_failures times,
    as Ray Train retries its workers. (metrics, checkpoint URI) of the last report."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pipeline.train.loop import train_task

    # Outside any placement group its caller runs in (a Tune trial's holds only the trial's own
    # reservation): the task asks for the worker's resources itself, as Ray Train's workers do.
    task = ray.remote(train_task).options(num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0, max_retries=0,
                                          scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    failures = 0
    while True:
        found = latest_checkpoint(storage, output)
        try:
            return ray.get(task.remote(loop_config | {"run_dir": output, "found_checkpoint": found and found[0]}))
        except ray.exceptions.RayError as exc:  # RayTaskError (the loop raised) or the worker died
            failures += 1
            if 0 <= cfg.max_failures < failures:
                raise
            log.warning("training attempt %d failed (%s); retrying from the newest checkpoint", failures, str(exc).splitlines()[0][:300])


HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.2"  # a user's own setting of HEALTH_CHECK_ENV wins


def captions_problem(dataset, objective: str) -> str | None:
    """Why `objective` cannot train on `dataset` (a ShardDataset) for want of captions, or None."""
    if objective == "local_contrastive" and not dataset.captioned:
        return (f"{dataset.root}: train.objective local_contrastive needs captions, and this dataset was built "
                "without a captioner (captioner.backend none); caption it, or train with objective mae")
    return None


def run_training(dataset_uri: str, cfg: TrainConfig, storage: Storage | None = None,
                 on_progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train on a dataset (directory, NAME/vN, NAME/LATEST or NAME) on Ray; Ray must be up.
    `on_progress(line)` gets rank 0's progress lines (loss every 10 steps, checkpoints, the held-out
    metrics) as training runs, in this process (the train flow logs them to Prefect)."""
    storage = storage or Storage()
    dataset = ShardDataset(dataset_uri, decode=False, storage=storage)
    if problem := captions_problem(dataset, cfg.objective):
        raise ValueError(problem)
    name = cfg.name or run_name(dataset.root, cfg.objective)
    output = join(cfg.output, name)
    train_range, eval_range, eval_on_train = split_shards(len(dataset.shards), cfg.data.holdout_shards)
    train_images = training_images(dataset, cfg.data.holdout_shards)
    if cfg.data.max_images is not None:
        if cfg.data.max_images > train_images:
            raise ValueError(f"train.data.max_images is {cfg.data.max_images} but {dataset.root} has only {train_images} "
                             f"training images (after holding out {cfg.data.holdout_shards} shard(s))")
        train_images = cfg.data.max_images
    if eval_on_train:
        log.warning("%s has %d shard(s), not more than data.holdout_shards=%d: evaluating on the training shards",
                    dataset.root, len(dataset.shards), cfg.data.holdout_shards)
    init = earlier_version_checkpoint(storage, dataset.root, cfg) if cfg.start == "previous_version" else None
    if cfg.start == "previous_version":
        log.info("train.start previous_version: %s", f"fine-tuning from {init}" if init else
                 f"no run trained on a version before {dataset.root} in {cfg.output}: starting from scratch")
    loop_config = {
        "train": cfg.model_dump(mode="json"), "dataset": dataset.root, "storage": storage,
        "train_shards": train_range, "eval_shards": eval_range, "init_checkpoint": init,
        **settle_tokenizer(cfg, dataset, dataset.shards[slice(*train_range)], storage, output, init),
    }
    if on_progress is not None:
        from ray.util.queue import Queue

        loop_config["progress"] = Queue(maxsize=1000)  # rank 0's progress lines, for on_progress
    task = on_task(cfg)
    if task:
        run = lambda: run_on_task(loop_config, cfg, storage, output)  # noqa: E731
    else:
        run = lambda: fit_on_ray_train(loop_config, cfg, storage, name, output)  # noqa: E731
    last_metrics, checkpoint = while_reporting(run, loop_config.get("progress"), on_progress)
    metrics = dict(last_metrics or {})
    metrics |= {"dataset": dataset.root, "name": name, "objective": cfg.objective, "eval_on_train": eval_on_train,
                "train_shards": list(train_range), "eval_shards": list(eval_range), "train_images": train_images,
                "launcher": "ray_task" if task else "ray_train", "checkpoint": checkpoint, "init_from": init}
    storage.write_bytes(join(output, METRICS), json.dumps(metrics, indent=1).encode())
    return TrainResult(name, output, dataset.root, checkpoint, metrics)


def fit_on_ray_train(loop_config: dict, cfg: TrainConfig, storage: Storage, name: str, output: str) -> tuple[dict, str | None]:
    """The loop on Ray Train's TorchTrainer: (metrics, checkpoint URI) of the last report."""
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.loop import train_worker

    storage_path, filesystem = ray_storage(cfg.output, storage)
    found = latest_checkpoint(storage, output)
    if found:
        path = found[0][len("s3://"):] if is_s3(found[0]) else found[0]
        loop_config = loop_config | {"found_checkpoint": Checkpoint(path, filesystem)}
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    # Ray Train's controller polls its workers every 2 s by default, and only a poll sees that they have
    # finished. A no-op training on 2 cores (benchmarks/train_start.py): 8-12 s by default, 8-9 s at
    # 0.2 s when idle, 17-19 s against 11-14 s when busy; the 7-9 s before the loop starts are Ray's
    # actor processes. The controller reads this from the environment it is started with.
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL_S)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    result = trainer.fit()
    checkpoint = None
    if result.checkpoint is not None:
        checkpoint = ("s3://" + result.checkpoint.path) if is_s3(cfg.output) else result.checkpoint.path
    return result.metrics, checkpoint
