"""What the training loop needs from whatever runs it: its rank, its device, the checkpoints to resume
from, and where its reports and checkpoints go.

RayTrainSession is a rank of Ray Train's TorchTrainer (DDP across workers, Ray Train's checkpoint
storage and restarts). TaskSession is a single worker on one Ray task (runner.run_on_task): no
controller or worker actors to start, checkpoints written through our Storage (checkpoints.py).
"""

from __future__ import annotations

import torch

from pipeline.storage import Storage
from pipeline.train.checkpoints import StoredCheckpoint, save_checkpoint


class RayTrainSession:
    def __init__(self, found_checkpoint=None):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        # Ray Train's restored checkpoint, and the newer one the driver may have found in the run
        # folder (uploaded, but killed before Ray Train recorded it).
        self.checkpoints = [c for c in (found_checkpoint, ray.train.get_checkpoint()) if c is not None]

    def prepare(self, model):
        import ray.train.torch

        # DDP when there is more than one rank; every parameter takes part in every step's loss.
        return ray.train.torch.prepare_model(model) if self.world > 1 else model.to(self.device)

    def report(self, metrics: dict, folder: str | None = None) -> None:
        """Every rank reports (Ray Train waits for all); rank 0 passes the checkpoint folder."""
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint)


class TaskSession:
    rank, world = 0, 1

    def __init__(self, storage: Storage, run_dir: str, keep: int, found_uri: str | None, use_gpu: bool):
        self.storage, self.run_dir, self.keep = storage, run_dir, keep
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.checkpoints = [StoredCheckpoint(storage, found_uri)] if found_uri else []
        self.metrics: dict = {}
        self.checkpoint: str | None = None  # the last checkpoint written, as Ray Train's result has it

    def prepare(self, model):
        return model.to(self.device)

    def report(self, metrics: dict, folder: str | None = None) -> None:
        self.metrics = metrics
        if folder:
            self.checkpoint = save_checkpoint(self.storage, self.run_dir, folder, self.keep)
