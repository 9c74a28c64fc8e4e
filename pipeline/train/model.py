"""The PS3-style local contrastive model, built from transformers' SigLIP blocks.

The image tower sees the image twice: whole at low resolution (the global view), and as a fixed
budget of K patches picked from the high-resolution grid, so the cost of a step stays near-constant
as resolution grows. Patch selection scores every high-res patch from the low-res features: a
bottom-up score (a learned query: "what is salient") and a top-down score (the caption's embedding:
"what the text asks for"); both are supervised by the box's patch map. In training the box's patches
are taken first and the rest of the budget by score. High-res tokens attend to the low-res tokens of
the same layer (PS3's low-res KV context), so a patch knows the scene it sits in.

Losses: sigmoid (SigLIP) contrastive between the in-box pooled high-res feature and the box caption
(global samples: the pooled low-res feature and the global caption; captions equal as text count as
positives), plus BCE of both selection scores against the box map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from schemas.train import ModelOptions


def _siglip_towers(opts: ModelOptions, vocab_size: int, pad_id: int, eos_id: int):
    """(vision, text) transformers modules: loaded from opts.pretrained, or random from the sizes."""
    from transformers import SiglipModel, SiglipTextConfig, SiglipTextModel, SiglipVisionConfig, SiglipVisionModel

    if opts.pretrained:
        both = SiglipModel.from_pretrained(opts.pretrained)
        return both.vision_model, both.text_model
    vision = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=opts.hidden_size, intermediate_size=opts.mlp_size, num_hidden_layers=opts.layers,
        num_attention_heads=opts.heads, image_size=opts.low_res, patch_size=opts.patch_size, vision_use_head=False))
    text = SiglipTextModel(SiglipTextConfig(
        vocab_size=vocab_size, hidden_size=opts.text_hidden_size, intermediate_size=opts.text_mlp_size,
        num_hidden_layers=opts.text_layers, num_attention_heads=opts.text_heads, max_position_embeddings=opts.max_text_len,
        pad_token_id=pad_id, bos_token_id=eos_id, eos_token_id=eos_id, projection_size=opts.text_hidden_size))
    return vision, text


def gather_patches(images: torch.Tensor, index: torch.Tensor, patch: int) -> torch.Tensor:
    """The pixels of the patches `index` (B, K; row-major over the patch grid) of images (B, C, H, W),
    as (B, K, C*p*p) in the patch-embedding conv's weight order. Reads only those pixels: the cost
    does not grow with the image."""
    b, c, h, w = images.shape
    rows, cols = index // (w // patch), index % (w // patch)
    offsets = torch.arange(patch, device=images.device)
    ys = (rows[..., None] * patch + offsets)[..., :, None]  # B, K, p, 1
    xs = (cols[..., None] * patch + offsets)[..., None, :]  # B, K, 1, p
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    pixels = images[batch, :, ys, xs]  # B, K, p, p, C (advanced indices first, then the channel slice)
    return pixels.permute(0, 1, 4, 2, 3).reshape(b, index.shape[1], c * patch * patch)


def select_patches(score: torch.Tensor, box_map: torch.Tensor | None, budget: int) -> torch.Tensor:
    """Indices (B, K) of the K patches to encode: inside the box first, then the highest scores."""
    priority = score.detach().float().sigmoid()
    if box_map is not None:
        priority = priority + 2.0 * box_map.float()  # sigmoid < 1: any in-box patch outranks every other
    return priority.topk(min(budget, score.shape[1]), dim=1).indices


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss; `positives` (B_img, B_txt) marks matching pairs."""
    logits = image @ text.t() * scale.exp() + bias
    labels = positives.float() * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


class LocalContrastiveModel(nn.Module):
    def __init__(self, opts: ModelOptions, vocab_size: int, pad_id: int = 0, eos_id: int = 2):
        super().__init__()
        self.opts = opts
        vision, text = _siglip_towers(opts, vocab_size, pad_id, eos_id)
        if getattr(vision, "head", None) is not None:  # SigLIP's attention-pool head: we pool by box instead
            del vision.head
        self.vision, self.text = vision, text
        if vision.config.patch_size != opts.patch_size:  # the data's patch maps must match the tower's grid
            raise ValueError(f"model.patch_size is {opts.patch_size} but {opts.pretrained} has patches of "
                             f"{vision.config.patch_size} pixels: set model.patch_size to {vision.config.patch_size}")
        self.max_text_len = min(opts.max_text_len, text.config.max_position_embeddings)
        width, text_width = vision.config.hidden_size, text.config.projection_size
        self.patch = vision.config.patch_size
        self.image_proj = nn.Linear(width, opts.embed_dim)
        self.text_proj = nn.Linear(text_width, opts.embed_dim)
        self.bottom_up = nn.Linear(width, 1)  # the learned saliency query
        self.top_down = nn.Linear(width, opts.embed_dim)  # low-res features into the text space
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    # -- towers ---------------------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(input_ids=input_ids).pooler_output), dim=-1)

    def positions_at(self, index: torch.Tensor, side: int) -> torch.Tensor:
        """Position embeddings (B, K, D) of patches `index` of a side x side image: the learned grid
        sampled bicubically at those patches' centres only (as interpolating the whole table to the
        high-res grid would, without the cost growing with the grid)."""
        weight = self.vision.embeddings.position_embedding.weight  # (n*n, D)
        n, grid = math.isqrt(weight.shape[0]), side // self.patch
        table = weight.t().reshape(1, -1, n, n)
        centres = torch.stack([(index % grid).float(), (index // grid).float()], dim=-1)  # x, y in patches
        points = ((centres + 0.5) / grid * 2 - 1).reshape(1, -1, 1, 2).to(table.dtype)
        out = F.grid_sample(table, points, mode="bicubic", padding_mode="border", align_corners=False)  # 1, D, B*K, 1
        return out[0, :, :, 0].t().reshape(*index.shape, -1)

    def encode_low(self, low: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Low-res tokens after the last layer (post-norm), and each layer's input (the KV context)."""
        x = self.vision.embeddings(low, interpolate_pos_encoding=True)
        inputs = []
        for layer in self.vision.encoder.layers:
            inputs.append(x)
            x = layer(x, attention_mask=None)
        return self.vision.post_layernorm(x), inputs

    def _context_layer(self, layer, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """One SigLIP layer for high-res tokens whose keys and values also cover the low-res tokens."""
        attn = layer.self_attn
        b, k, d = x.shape
        h = layer.layer_norm1(x)
        kv = h if context is None else torch.cat([layer.layer_norm1(context), h], dim=1)

        def heads(t):
            return t.view(b, -1, attn.num_heads, attn.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(attn.q_proj(h)), heads(attn.k_proj(kv)), heads(attn.v_proj(kv)), scale=attn.scale)
        x = x + attn.out_proj(out.transpose(1, 2).reshape(b, k, d))
        return x + layer.mlp(layer.layer_norm2(x))

    def encode_high(self, high: torch.Tensor, index: torch.Tensor, context: list[torch.Tensor]) -> torch.Tensor:
        """The selected high-res patches (B, K) through the tower; (B, K, D) post-norm."""
        emb = self.vision.embeddings
        conv = emb.patch_embedding
        pixels = gather_patches(high, index, self.patch)
        x = pixels.to(conv.weight.dtype) @ conv.weight.flatten(1).t() + conv.bias
        x = x + self.positions_at(index, high.shape[-1])
        for layer, ctx in zip(self.vision.encoder.layers, context):
            x = self._context_layer(layer, x, ctx if self.opts.low_res_context else None)
        return self.vision.post_layernorm(x)

    def selection_logits(self, low_feats: torch.Tensor, text_emb: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bottom-up and top-down logits over the high-res grid (B, grid*grid), from the low-res features."""
        b, n, _ = low_feats.shape
        side = int(math.isqrt(n))
        bottom_up = self.bottom_up(low_feats)[..., 0]
        top_down = torch.einsum("bnd,bd->bn", F.normalize(self.top_down(low_feats), dim=-1), text_emb.detach()) * 10.0

        def up(t):
            return F.interpolate(t.view(b, 1, side, side), size=(grid, grid), mode="bilinear", align_corners=False).flatten(1)

        return up(bottom_up), up(top_down)

    def region_features(self, low: torch.Tensor, high: torch.Tensor, box_map: torch.Tensor, text_emb: torch.Tensor):
        """Everything a step needs: the pooled image embeddings (in-box high-res, and global low-res),
        and both selection logits."""
        low_feats, context = self.encode_low(low)
        grid = high.shape[-1] // self.patch
        bottom_up, top_down = self.selection_logits(low_feats, text_emb, grid)
        flat_map = box_map.flatten(1)
        index = select_patches(bottom_up + top_down, flat_map, self.opts.patch_budget)
        high_feats = self.encode_high(high, index, context)
        in_box = flat_map.gather(1, index).float()
        in_box = torch.where(in_box.sum(1, keepdim=True) > 0, in_box, torch.ones_like(in_box))  # no box: pool all selected
        pooled_high = (high_feats * in_box[..., None]).sum(1) / in_box.sum(1, keepdim=True)
        local = F.normalize(self.image_proj(pooled_high), dim=-1)
        global_ = F.normalize(self.image_proj(low_feats.mean(1)), dim=-1)
        return local, global_, bottom_up, top_down

    def forward(self, low, high, box_map, is_global, input_ids, gather=None):
        """The loss of a batch and its parts. `gather` (DDP) all-gathers tensors across ranks so every
        image also sees the other ranks' captions as negatives."""
        text_emb = self.encode_text(input_ids)
        local, global_, bottom_up, top_down = self.region_features(low, high, box_map, text_emb)
        image_emb = torch.where(is_global[:, None], global_, local)
        all_text, all_ids = (text_emb, input_ids) if gather is None else (gather(text_emb, True), gather(input_ids, False))
        positives = (input_ids[:, None, :] == all_ids[None, :, :]).all(-1)
        contrastive = sigmoid_loss(image_emb, all_text, positives, self.logit_scale, self.logit_bias)
        target = box_map.flatten(1).float()
        weight = (~is_global).float()[:, None].expand_as(target)
        selection = (F.binary_cross_entropy_with_logits(bottom_up, target, weight=weight, reduction="sum")
                     + F.binary_cross_entropy_with_logits(top_down, target, weight=weight, reduction="sum")) / weight.sum().clamp(min=1)
        return {"contrastive": contrastive, "selection": selection}


def build_mae(opts: ModelOptions, mae_opts):
    """transformers' ViT-MAE with the run's encoder sizes and the MAE section's decoder and mask ratio."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    return ViTMAEForPreTraining(ViTMAEConfig(
        image_size=mae_opts.image_size, patch_size=opts.patch_size, hidden_size=opts.hidden_size,
        num_hidden_layers=opts.layers, num_attention_heads=opts.heads, intermediate_size=opts.mlp_size,
        decoder_hidden_size=mae_opts.decoder_hidden_size, decoder_num_hidden_layers=mae_opts.decoder_layers,
        decoder_num_attention_heads=mae_opts.decoder_heads, decoder_intermediate_size=mae_opts.decoder_hidden_size * 4,
        mask_ratio=mae_opts.mask_ratio))
