"""The sweep config (`localcap sweep CONFIG`) and the table of its trials: one source of truth for both.

A sweep trains one model per point of a grid (or list) over training images, resolution, model size
and objective, each trial the ordinary training loop (schemas.train.TrainConfig) on the first N images
of one dataset version, ending with a held-out metric (the k-NN probe by default), and fits scaling
laws to the results (pipeline/sweep/).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal

import os
from pathlib import Path

import pyarrow as pa
from pydantic import Field, ValidationError, field_validator, model_validator

from schemas.base import Section
from schemas.config import ConfigError, RaySection, StorageSection, _format_errors, absolute_path, read_yaml, train_with_absolute_paths
from schemas.train import TINY_MAE, TINY_MODEL, ModelOptions, ProbeOptions, TrainConfig

Objective = Literal["local_contrastive", "mae"]
LAWS = ("log_product", "log_linear", "saturating")
BUILT_IN_MODELS = {"tiny": TINY_MODEL, "base": {}}  # base: train.model as given


class TrialPoint(Section):
    images: int = Field(..., ge=1, description="Training images: the first N of the dataset's training shards.")
    resolution: int = Field(..., ge=16, description="High-res side in pixels: model.high_res (local_contrastive) or mae.image_size (mae).")
    model: str = Field("tiny", description="A name in `models`, or a built-in: tiny (the test sizes), base (train.model as given).")
    objective: Objective = "mae"


class SweepGrid(Section):
    """Every combination of these (a full grid)."""

    images: list[int] = Field(..., min_length=1)
    resolution: list[int] = Field(..., min_length=1)
    model: list[str] = Field(["tiny"], min_length=1)
    objective: list[Objective] = Field(["mae"], min_length=1)

    def points(self) -> list[TrialPoint]:
        return [TrialPoint(images=n, resolution=r, model=m, objective=o)
                for o in self.objective for m in self.model for r in self.resolution for n in self.images]


class FitOptions(Section):
    laws: list[Literal["log_product", "log_linear", "saturating"]] = Field(list(LAWS), min_length=1)
    bootstrap: int = Field(200, ge=0, description="Resamples of the trials for the parameters' uncertainties (0: none).")
    target: float | None = Field(None, description="A metric value to reach: the fit predicts the training images needed at each resolution.")
    seed: int = 0


class SweepConfig(Section):
    name: str = Field("sweep", min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="The sweep's folder under `output`; rerun = resume.")
    dataset: str = Field(..., min_length=1, description="The dataset every trial trains on: directory, NAME/vN, NAME/LATEST or NAME (path or s3://).")
    output: str = Field("sweep-output", min_length=1, description="OUTPUT/NAME/ holds trials/, results.parquet, fit.json, the plots and index.html.")
    metric: str = Field("probe_acc", description="The held-out figure the laws are fitted to: a key of the trials' metrics "
                        "(probe_acc, with train.probe's defaults when it is unset; region_to_caption_r1 for local_contrastive; "
                        "eval_loss for mae).")
    grid: SweepGrid | None = None
    trials: list[TrialPoint] | None = Field(None, description="An explicit list of points instead of (or besides) `grid`.")
    models: dict[str, dict] = Field({}, description="Named model sizes: fields of train.model (hidden_size, layers, ...) over train.model.")
    epochs: float | None = Field(None, gt=0, description="None: every trial takes train.steps steps (equal compute, the data-size axis "
                                 "measures diversity); set: each trial makes this many passes over its images (compute grows with data).")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Default: as many as the cluster's CPUs (GPUs) hold at once.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Every trial's training config, before the point's changes "
                               "(its name and output are the trial's: OUTPUT/NAME/trials/ID).")
    fit: FitOptions = Field(default_factory=FitOptions)
    storage: StorageSection = Field(default_factory=StorageSection)
    ray: RaySection = Field(default_factory=RaySection)

    @field_validator("models")
    @classmethod
    def _model_fields(cls, models: dict[str, dict]) -> dict[str, dict]:
        for name, fields in models.items():
            unknown = set(fields) - set(ModelOptions.model_fields)
            if unknown:
                raise ValueError(f"models.{name}: unknown model field(s) {sorted(unknown)}")
        return models

    @model_validator(mode="after")
    def _points(self) -> SweepConfig:
        points = self.points()
        if not points:
            raise ValueError("a sweep needs `grid` or `trials`")
        names = set(self.models) | set(BUILT_IN_MODELS)
        for p in points:
            if p.model not in names:
                raise ValueError(f"model {p.model!r} is neither in `models` nor built in ({sorted(BUILT_IN_MODELS)})")
            trial_config(self, p)  # each point's train config must be valid (e.g. resolution a multiple of the patch size)
        return self

    def points(self) -> list[TrialPoint]:
        """The grid's points then the listed ones, each once."""
        seen: dict[tuple, TrialPoint] = {}
        for p in (self.grid.points() if self.grid else []) + list(self.trials or []):
            seen.setdefault((p.objective, p.model, p.images, p.resolution), p)
        return list(seen.values())


def load_sweep_config(path: str | Path, overrides: dict | None = None, base: str | Path | None = None) -> SweepConfig:
    """A sweep config from YAML with dotted overrides; its local paths (dataset, output, train's) made
    absolute against `base` (the caller's working directory), as Ray's trials run elsewhere."""
    base = base or os.getcwd()
    try:
        cfg = SweepConfig.model_validate(read_yaml(path, overrides))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, str(path))) from None
    return cfg.model_copy(update={"dataset": absolute_path(cfg.dataset, base), "output": absolute_path(cfg.output, base),
                                  "train": train_with_absolute_paths(cfg.train, base)})


def trial_config(sweep: SweepConfig, point: TrialPoint) -> TrainConfig:
    """The train config of one trial: the sweep's train section with the point's model sizes,
    resolution, objective and data size (and steps, under `epochs`)."""
    base = sweep.train
    sizes = sweep.models.get(point.model, BUILT_IN_MODELS.get(point.model, {}))
    model = base.model.model_dump() | sizes
    mae = base.mae.model_dump() | (TINY_MAE if point.model == "tiny" and "tiny" not in sweep.models else {})
    if point.objective == "mae":
        mae["image_size"] = point.resolution
    else:
        model["high_res"] = point.resolution
    steps = base.steps
    if sweep.epochs is not None:
        steps = max(1, math.ceil(sweep.epochs * point.images / (base.batch_size * base.num_workers)))
    data = base.data.model_copy(update={"max_images": point.images})
    return TrainConfig.model_validate(base.model_dump() | {
        "objective": point.objective, "preset": "base", "model": model, "mae": mae, "data": data.model_dump(), "steps": steps,
        "probe": base.probe.model_dump() if base.probe else ProbeOptions().model_dump() if sweep.metric.startswith("probe_") else None,
        "name": None})


def trial_id(point: TrialPoint, cfg: TrainConfig) -> str:
    """A readable, stable id: the point, and a digest of its full train config (a changed config is a new trial)."""
    digest = hashlib.sha256(json.dumps(cfg.model_dump(mode="json", exclude={"name", "output"}), sort_keys=True).encode()).hexdigest()[:8]
    return f"{point.objective}-{point.model}-n{point.images}-r{point.resolution}-{digest}"


TRIAL_SCHEMA = pa.schema([
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("objective", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("images", pa.int64(), nullable=False),
    pa.field("resolution", pa.int64(), nullable=False),
    pa.field("steps", pa.int64(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # finished | error | pending
    pa.field("metric", pa.float64()),  # the sweep's `metric`, copied out of metrics_json
    pa.field("probe_acc", pa.float64()),
    pa.field("probe_chance", pa.float64()),
    pa.field("probe_acc_init", pa.float64()),  # the probe on the trial's untrained weights (same seed): what training added
    pa.field("last_loss", pa.float64()),
    pa.field("params", pa.int64()),  # trainable parameters of the trial's model
    pa.field("seconds", pa.float64()),
    pa.field("checkpoint", pa.string()),
    pa.field("error", pa.string()),
    pa.field("metrics_json", pa.string()),  # everything the trial reported
])
