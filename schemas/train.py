"""The train config: the `train:` section of a run config, or a YAML file of its own for `localcap train`.

Two objectives share one loop (pipeline/train/): `local_contrastive` (PS3-style: a low-res global view
plus a fixed budget of selected high-res patches, contrasted with box and global captions) and `mae`
(masked auto-encoding with transformers' ViT-MAE, no captions needed).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas.base import Section as _Section


class ModelOptions(_Section):
    """Towers built from SigLIP's transformers blocks: tiny from these sizes, or loaded from `pretrained`."""

    pretrained: str | None = Field(
        None, description="Local SigLIP directory (SiglipModel + its tokenizer, e.g. a saved google/siglip-base-patch16-224): "
        "both towers start from it and its sizes win over the ones below. None: random init from the sizes below.")
    patch_size: int = Field(16, ge=2, description="Pixels per patch side, for both resolutions.")
    low_res: int = Field(384, ge=16, description="Side of the low-res global view (square).")
    high_res: int = Field(1536, ge=16, description="Side of the high-res image the selected patches come from (square).")
    patch_budget: int = Field(1024, ge=1, description="High-res patches encoded per image (PS3's fixed budget).")
    hidden_size: int = Field(768, ge=8)
    layers: int = Field(12, ge=1)
    heads: int = Field(12, ge=1)
    mlp_size: int = Field(3072, ge=8)
    text_hidden_size: int = Field(768, ge=8)
    text_layers: int = Field(12, ge=1)
    text_heads: int = Field(12, ge=1)
    text_mlp_size: int = Field(3072, ge=8)
    max_text_len: int = Field(64, ge=4, description="Captions are padded/truncated to this many tokens.")
    vocab_size: int = Field(32000, ge=64, description="Size of the tokenizer trained on the dataset's captions (no `tokenizer`).")
    embed_dim: int = Field(512, ge=8, description="Shared image-text space.")
    low_res_context: bool = Field(True, description="High-res tokens attend to the low-res tokens of the same layer (PS3's low-res KV context).")

    @model_validator(mode="after")
    def _sizes(self) -> ModelOptions:
        for side in ("low_res", "high_res"):
            if getattr(self, side) % self.patch_size:
                raise ValueError(f"{side} ({getattr(self, side)}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % self.heads or self.text_hidden_size % self.text_heads:
            raise ValueError("hidden sizes must be multiples of their head counts")
        return self


TINY_MODEL = dict(patch_size=16, low_res=64, high_res=256, patch_budget=48, hidden_size=64, layers=2, heads=2, mlp_size=128,
                  text_hidden_size=64, text_layers=2, text_heads=2, text_mlp_size=128, max_text_len=16, vocab_size=400, embed_dim=64)


TINY_MAE = dict(image_size=64, decoder_hidden_size=64, decoder_layers=1, decoder_heads=2)


class DataOptions(_Section):
    global_caption_prob: float = Field(0.25, ge=0, le=1, description="Share of samples that pair the whole image with its global caption; the rest pick one random box.")
    crop_scale: tuple[float, float] = Field((0.9, 1.0), description="Random resized crop: share of the image area kept (boxes move with it).")
    shuffle_buffer: int = Field(256, ge=0, description="Samples mixed in memory per reader (0: stream order).")
    holdout_shards: int = Field(1, ge=0, description="The dataset's last N shards are held out for evaluation and never trained on.")
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per train worker (decode and augment).")
    max_images: int | None = Field(None, ge=1, description="Train on only the first N images of the training shards (in shard "
                                   "order: a larger N only adds images), e.g. a scaling study's data size. None: all of them.")

    @model_validator(mode="after")
    def _scale(self) -> DataOptions:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("crop_scale must be 0 < min <= max <= 1")
        return self


class MaeOptions(_Section):
    mask_ratio: float = Field(0.8, gt=0, lt=1, description="Share of patches hidden from the encoder.")
    image_size: int = Field(224, ge=16, description="Side the image is resized to (the MAE sees one resolution).")
    decoder_hidden_size: int = Field(512, ge=8)
    decoder_layers: int = Field(8, ge=1)
    decoder_heads: int = Field(16, ge=1)


class EvalOptions(_Section):
    max_images: int = Field(500, ge=1, description="Held-out images evaluated (every box of each is a region).")
    batch_size: int = Field(32, ge=1)


class ProbeOptions(_Section):
    """A k-NN probe on the trained model's frozen features, at the end of training: a held-out figure of what
    the representation knows (MAE's reconstruction loss does not say that)."""

    task: Literal["scenes", "captions"] = Field(
        "scenes", description="scenes: the planted objects of generated labelled scenes, labelled by `label` (their true boxes and kinds); "
        "captions: the held-out shards' captioned boxes, labelled by their caption text.")
    images: int = Field(32, ge=2, description="Scenes generated (scenes), or held-out images read at most (captions).")
    label: Literal["kind", "colour", "kind_colour"] = Field("kind", description="scenes: what a planted object is labelled by.")
    scene_size: tuple[int, int] = Field((1024, 768), description="scenes: width and height of the generated scenes.")
    seed: int = Field(1_000_000, description="scenes: the first scene's seed (far from the demo's and the tests' seeds).")
    k: int = Field(5, ge=1, description="Neighbours that vote; a region's neighbours come from other images only.")


class TrainConfig(_Section):
    objective: Literal["local_contrastive", "mae"] = Field("local_contrastive")
    output: str = Field("train-output", min_length=1, description="Where runs keep checkpoints and metrics: OUTPUT/NAME/ (path or s3://).")
    name: str | None = Field(None, description="Run name; rerunning a name resumes from its last checkpoint. Default: from the dataset and objective.")
    start: Literal["scratch", "previous_version"] = Field(
        "scratch", description="scratch: from random weights (or model.pretrained). previous_version: on a published "
        "version NAME/vN, from the weights of the newest checkpoint of the run that trained on its nearest earlier "
        "version (same output and objective; its tokenizer too), with a fresh optimizer and step count: a fine-tune, "
        "cheaper per night. scratch is the default because a version's model then depends on that version alone: "
        "reproducible, and a sample taken down with `localcap remove` leaves nothing in later models (a fine-tuned "
        "chain keeps every earlier version in its weights). With no earlier run to start from, it starts from scratch.")
    preset: Literal["tiny", "base"] = Field(
        "base", description="'tiny': the small test/demo sizes (overrides model sizes and patch budget); 'base': the sizes in `model`.")
    model: ModelOptions = Field(default_factory=ModelOptions)
    tokenizer: str | None = Field(None, description="Local tokenizer directory; None: the pretrained model's, else one trained on the dataset's captions.")
    data: DataOptions = Field(default_factory=DataOptions)
    mae: MaeOptions = Field(default_factory=MaeOptions)
    eval: EvalOptions = Field(default_factory=EvalOptions)
    probe: ProbeOptions | None = Field(None, description="Also run a k-NN probe on frozen features at the end (metrics probe_acc, probe_chance).")
    steps: int = Field(10000, ge=1, description="Optimizer steps in all (a resumed run continues to this count).")
    batch_size: int = Field(32, ge=1, description="Images per train worker per step.")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(100, ge=0)
    selection_loss_weight: float = Field(1.0, ge=0, description="Weight of the BCE supervision of both selection scores by the box map.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints (one more at the end).")
    keep_checkpoints: int = Field(2, ge=1)
    num_workers: int = Field(1, ge=1, description="Workers (DDP ranks): more than one run on Ray Train, a single one on one Ray task.")
    use_gpu: bool = Field(False, description="One GPU per worker; bf16 autocast on GPU.")
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=-1, description="Worker failures a run recovers from (restarting from the last checkpoint); -1: no limit.")
    seed: int = Field(0)

    @model_validator(mode="after")
    def _start(self) -> TrainConfig:
        if self.start == "previous_version" and self.name:
            raise ValueError("train.start previous_version finds the earlier version's run by its default name (NAME-vN-OBJECTIVE); "
                             "leave train.name unset (a fixed name would resume one run on every version)")
        return self

    @model_validator(mode="after")
    def _mae_grid(self) -> TrainConfig:
        side, patch = self.mae_options().image_size, self.model_options().patch_size
        if self.objective == "mae" and side % patch:
            raise ValueError(f"mae.image_size ({side}) must be a multiple of patch_size ({patch})")
        return self

    def mae_options(self) -> MaeOptions:
        """The MAE sizes this run uses: a small decoder under the tiny preset."""
        if self.preset == "tiny":
            return self.mae.model_copy(update=TINY_MAE)
        return self.mae

    def model_options(self) -> ModelOptions:
        """The model sizes this run uses: the tiny preset's, or `model`."""
        if self.preset == "tiny":
            return self.model.model_copy(update=TINY_MODEL)
        return self.model
