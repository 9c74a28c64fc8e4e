"""A run's checkpoints in OUTPUT/NAME/checkpoint_<time>/ (a path or s3://), found by listing the folder.

Ray Train writes them there on its own; a single-worker run on a Ray task writes them here, with
train.json last, so that a folder holding train.json is a whole checkpoint whichever wrote it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.storage import Storage, is_s3, join

STATE = "state.pt"
TRAIN_JSON = "train.json"  # written last: its presence marks a whole checkpoint
PREFIX = "checkpoint_"


def latest_checkpoint(storage: Storage, run_dir: str) -> tuple[str, int] | None:
    """(uri, step) of the newest whole checkpoint in OUTPUT/NAME, found by listing it. Ray Train
    records a checkpoint in its run snapshot only after the upload; a kill in between would otherwise
    lose the newest one (or, before the first snapshot, all of them)."""
    best = None
    for uri, step in _whole_checkpoints(storage, run_dir):
        if best is None or step > best[1]:
            best = (uri, step)
    return best


def _whole_checkpoints(storage: Storage, run_dir: str) -> Iterator[tuple[str, int]]:
    for name in storage.list_dirs(run_dir):
        uri = join(run_dir, name)
        if not name.startswith(PREFIX) or not storage.exists(join(uri, STATE)):
            continue
        try:
            yield uri, json.loads(storage.read_bytes(join(uri, TRAIN_JSON)))["step"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue


def save_checkpoint(storage: Storage, run_dir: str, folder: str, keep: int) -> str:
    """Copy a local checkpoint folder to OUTPUT/NAME/checkpoint_<time>/ (train.json last), then
    delete all but the `keep` newest whole checkpoints; the new checkpoint's URI."""
    now = time.time_ns()  # named as Ray Train names its checkpoints: checkpoint_<local time to the microsecond>
    uri = join(run_dir, PREFIX + time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now // 10**9)) + f".{now // 1000 % 10**6:06d}")
    for name in sorted(os.listdir(folder), key=lambda n: n == TRAIN_JSON):
        storage.put_file(Path(folder, name), join(uri, name))
    for old, _ in sorted(_whole_checkpoints(storage, run_dir), key=lambda c: c[1])[:-keep]:
        delete_checkpoint(storage, old)
    return uri


def delete_checkpoint(storage: Storage, uri: str) -> None:
    """train.json first, so that a kill half-way leaves no folder that looks whole."""
    storage.delete(join(uri, TRAIN_JSON))
    for name in storage.list_prefix(uri):
        storage.delete(join(uri, name))
    if not is_s3(uri):
        with contextlib.suppress(OSError):
            os.rmdir(uri)


class StoredCheckpoint:
    """A checkpoint folder in storage, readable as a local directory (Ray Train's Checkpoint's API)."""

    def __init__(self, storage: Storage, uri: str):
        self.storage, self.uri = storage, uri

    def __repr__(self) -> str:
        return self.uri

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        if not is_s3(self.uri):
            yield self.uri
            return
        with tempfile.TemporaryDirectory(prefix="checkpoint-") as folder:
            for name in self.storage.list_prefix(self.uri):
                Path(folder, name).write_bytes(self.storage.read_bytes(join(self.uri, name)))
            yield folder
