"""TransformerLens's weight processing, done on canonical weights before the model is built.

Each step leaves the model's logits unchanged (tests check this against the source model):
- `fold_layer_scale`: layer-scale gammas go into the output projections (always applied).
- `fold_ln`: a norm's weight and bias go into the linear maps that read it; the norm becomes
  centre-and-scale only (TL's "LNPre"). ln_pre writes the residual stream, so it stays.
- `center_writing_weights`: whatever writes to the residual stream is made mean-zero over
  d_model. Every reader is a LayerNorm, which removes the mean anyway.
- `fold_value_biases`: the value bias gives every head a constant output (pattern rows sum to 1),
  so it moves into the output bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PrismaError
from .config import TextConfig, ViTConfig
from .weights import BlockWeights, Norm, TextWeights, ViTWeights


def _bias(b: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros(like.shape[0], dtype=like.dtype, device=like.device) if b is None else b


def fold_layer_scale(blocks: list[BlockWeights]) -> None:
    for blk in blocks:
        if blk.ls1 is not None:
            blk.proj_w = blk.proj_w * blk.ls1[:, None]
            blk.proj_b = _bias(blk.proj_b, blk.proj_w) * blk.ls1
            blk.ls1 = None
        if blk.ls2 is not None:
            blk.fc2_w = blk.fc2_w * blk.ls2[:, None]
            blk.fc2_b = _bias(blk.fc2_b, blk.fc2_w) * blk.ls2
            blk.ls2 = None


def _fold_norm_into(norm: Norm, w: Tensor, b: Tensor | None, center: bool = True) -> tuple[Tensor, Tensor]:
    """Fold y = (n * g + beta) into the linear map x -> x W^T + b. After a LayerNorm (`center`)
    the reader's weights are centred over the input too: its input is mean-zero; not after an
    RMSNorm, whose output is not."""
    g, beta = norm
    new_b = _bias(b, w) + w @ beta
    new_w = w * g[None, :]
    return (new_w - new_w.mean(dim=1, keepdim=True) if center else new_w), new_b


def fold_block_norms(blocks: list[BlockWeights], center: bool = True) -> None:
    if any(b.ln1 is None or b.ln2 is None for b in blocks):
        raise PrismaError("fold_ln: these weights have no block norms to fold")
    for blk in blocks:
        blk.qkv_w, blk.qkv_b = _fold_norm_into(blk.ln1, blk.qkv_w, blk.qkv_b, center)
        if blk.gate_w is not None:  # a gated MLP reads the norm twice
            blk.gate_w, blk.gate_b = _fold_norm_into(blk.ln2, blk.gate_w, blk.gate_b, center)
        blk.fc1_w, blk.fc1_b = _fold_norm_into(blk.ln2, blk.fc1_w, blk.fc1_b, center)
        blk.ln1 = blk.ln2 = None


def fold_final_norm(weights, readers: list[tuple[object, str, str]], center: bool = True) -> None:
    """Fold `weights.ln_final` into each reader (object, weight attribute, bias attribute)."""
    if weights.ln_final is None:
        return
    for obj, w_name, b_name in readers:
        w, b = _fold_norm_into(weights.ln_final, getattr(obj, w_name), getattr(obj, b_name), center)
        setattr(obj, w_name, w)
        setattr(obj, b_name, b)
    weights.ln_final = None


def _final_readers(weights: ViTWeights, cfg: ViTConfig) -> list[tuple[object, str, str]]:
    """The linear maps that read the final norm's output (`cfg.folds_final_norm` says whether any does)."""
    if cfg.global_pool == "map" and cfg.final_norm == "tokens":
        return [(weights.attn_pool, "kv_w", "kv_b")]  # the pool reads the normalised tokens
    if weights.proj_w is not None:
        return [(weights, "proj_w", "proj_b")]
    readers = [(weights, "head_w", "head_b")] if weights.head_w is not None else []
    if weights.head_dist_w is not None:
        readers.append((weights, "head_dist_w", "head_dist_b"))
    return readers


def _centred(t: Tensor | None, dim: int = -1) -> Tensor | None:
    return None if t is None else t - t.mean(dim=dim, keepdim=True)


def center_block_writes(blocks: list[BlockWeights]) -> None:
    for blk in blocks:
        blk.proj_w = _centred(blk.proj_w, dim=0)
        blk.proj_b = _centred(_bias(blk.proj_b, blk.proj_w))
        blk.fc2_w = _centred(blk.fc2_w, dim=0)
        blk.fc2_b = _centred(_bias(blk.fc2_b, blk.fc2_w))


def _require_final_norm(cfg) -> None:
    if cfg.final_norm == "none":
        raise PrismaError(
            "center_writing_weights needs a final norm (the head reads the residual stream "
            "directly in this model, so centring would change the logits)"
        )


def _require_centring_readers(cfg) -> None:
    """center_writing_weights holds only where every reader of the residual stream removes the mean."""
    if cfg.norm_type == "rmsnorm":
        raise PrismaError("center_writing_weights needs every reader of the residual stream to remove the mean "
                          "(a LayerNorm); this model's norms are RMSNorms, which do not: load without "
                          "center_writing_weights")


def _require_linear_heads(cfg) -> None:
    """fold_value_biases and use_attn_result read z -> output as linear per head."""
    if cfg.attn_norm:
        for option in ("fold_value_biases", "use_attn_result"):
            if getattr(cfg, option):
                raise PrismaError(f"{option} needs each head's output to be linear in its z; this model normalises "
                                  "the heads' outputs together before the projection (scale_attn_norm): load "
                                  f"without {option}")


def center_vit_writes(weights: ViTWeights, cfg: ViTConfig) -> None:
    _require_final_norm(cfg)
    _require_centring_readers(cfg)
    if cfg.global_pool == "map" and cfg.final_norm != "tokens":
        raise PrismaError(
            "center_writing_weights needs every reader of the residual stream to be a norm (which removes "
            "the mean anyway); here the attention pool reads the final residual stream directly (the final "
            "norm comes after the pool): load without center_writing_weights")
    weights.patch_w = _centred(weights.patch_w, dim=0)
    if weights.patch_b is not None:
        weights.patch_b = _centred(weights.patch_b)
    weights.cls, weights.dist, weights.reg = (_centred(t) for t in (weights.cls, weights.dist, weights.reg))
    weights.pos_embed = _centred(weights.pos_embed)
    center_block_writes(weights.blocks)


def fold_value_biases(blocks: list[BlockWeights]) -> None:
    for blk in blocks:
        if blk.qkv_b is None:
            continue
        hd = blk.qkv_w.shape[0] // 3
        v_b = blk.qkv_b[2 * hd:]
        blk.proj_b = _bias(blk.proj_b, blk.proj_w) + blk.proj_w @ v_b
        blk.qkv_b = torch.cat([blk.qkv_b[: 2 * hd], torch.zeros_like(v_b)])


def process_weights(weights: ViTWeights, cfg: ViTConfig) -> None:
    """Apply, in TL's order, the processing `cfg` asks for (in place on ViT `weights`)."""
    fold_layer_scale(weights.blocks)
    _require_linear_heads(cfg)
    center = cfg.norm_type != "rmsnorm"
    if cfg.fold_ln:
        fold_block_norms(weights.blocks, center)
        if cfg.folds_final_norm:
            fold_final_norm(weights, _final_readers(weights, cfg), center)
    if cfg.center_writing_weights:
        center_vit_writes(weights, cfg)
    if cfg.fold_value_biases:
        fold_value_biases(weights.blocks)


def process_text_weights(weights: TextWeights, cfg: TextConfig) -> None:
    """The same processing for a text tower (the final norm folds into the text projection)."""
    fold_layer_scale(weights.blocks)
    _require_linear_heads(cfg)
    center = cfg.norm_type != "rmsnorm"
    if cfg.fold_ln:
        fold_block_norms(weights.blocks, center)
        if weights.proj_w is None:
            raise PrismaError("fold_ln: this text tower has no projection to fold its final norm into")
        fold_final_norm(weights, [(weights, "proj_w", "proj_b")], center)
    if cfg.center_writing_weights:
        _require_final_norm(cfg)
        _require_centring_readers(cfg)
        weights.token_embed = _centred(weights.token_embed)
        weights.pos_embed = _centred(weights.pos_embed)
        center_block_writes(weights.blocks)
    if cfg.fold_value_biases:
        fold_value_biases(weights.blocks)
