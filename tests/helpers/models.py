"""Tiny models built offline with random weights (nothing is downloaded in tests)."""

from __future__ import annotations

from pathlib import Path


def build_tiny_sam(folder: Path, image_size: int = 256, seed: int = 0) -> Path:
    """A ~100k-parameter SAM and its (PIL) processor saved to `folder`. The sizes that must agree:
    vision output channels = prompt-encoder and mask-decoder hidden sizes = 2 * num_pos_feats; the
    processor resizes and pads to the vision image size; low-res masks are a quarter of it."""
    import torch
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    dim, patch = 32, 16
    config = SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=patch,
                           output_channels=dim, num_pos_feats=dim // 2, window_size=4, global_attn_indexes=[1], mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=dim, image_size=image_size, patch_size=patch, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=dim, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=dim),
    )
    torch.manual_seed(seed)
    SamModel(config).eval().save_pretrained(folder)
    quarter = image_size // 4
    processor = SamImageProcessorPil(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
                                     mask_size={"longest_edge": quarter}, mask_pad_size={"height": quarter, "width": quarter})
    SamProcessor(image_processor=processor).save_pretrained(folder)
    return folder
