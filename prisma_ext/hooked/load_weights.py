"""Copy canonical `ViTWeights` into a HookedViT's parameters, checking every shape."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import PrismaError
from .weights import ViTWeights


def _set(param: nn.Parameter | None, value: Tensor | None, name: str, zero_if_missing: bool = True) -> None:
    if param is None:
        if value is not None:
            raise PrismaError(f"weights give {name} but the config builds no such parameter")
        return
    if value is None:
        if not zero_if_missing:
            raise PrismaError(f"weights lack {name}")
        value = torch.zeros_like(param)
    if tuple(value.shape) != tuple(param.shape):
        raise PrismaError(f"{name}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value)


def _linear(layer: nn.Linear, w: Tensor, b: Tensor | None, name: str) -> None:
    _set(layer.weight, w, f"{name}.weight", zero_if_missing=False)
    _set(layer.bias, b, f"{name}.bias")


def _norm(ln, norm, name: str) -> None:
    if ln is None:
        if norm is not None:
            raise PrismaError(f"weights give {name} but the config builds no such norm")
        return
    if ln.w is None:
        if norm is not None:
            raise PrismaError(f"{name}: folded norm (LNPre) but the weights still carry its affine part")
        return
    w, b = norm if norm is not None else (None, None)
    if w is None:
        raise PrismaError(f"weights lack {name}")
    _set(ln.w, w, f"{name}.weight")
    if ln.b is not None:
        _set(ln.b, b, f"{name}.bias")
    elif b is not None and bool(b.abs().max() > 0):
        raise PrismaError(f"{name}: an RMSNorm has no bias, and the weights give a nonzero one")


def _load_blocks(blocks, block_weights) -> None:
    for i, (block, bw) in enumerate(zip(blocks, block_weights)):
        if bw.ls1 is not None or bw.ls2 is not None:
            raise PrismaError("layer scale must be folded before loading (process_weights does it)")
        _norm(block.ln1, bw.ln1, f"blocks.{i}.ln1")
        _norm(block.ln2, bw.ln2, f"blocks.{i}.ln2")
        _linear(block.attn.qkv, bw.qkv_w, bw.qkv_b, f"blocks.{i}.attn.qkv")
        _linear(block.attn.proj, bw.proj_w, bw.proj_b, f"blocks.{i}.attn.proj")
        _linear(block.mlp.fc1, bw.fc1_w, bw.fc1_b, f"blocks.{i}.mlp.fc1")
        _linear(block.mlp.fc2, bw.fc2_w, bw.fc2_b, f"blocks.{i}.mlp.fc2")
        if block.mlp.gate is not None:
            _linear(block.mlp.gate, bw.gate_w, bw.gate_b, f"blocks.{i}.mlp.gate")
        elif bw.gate_w is not None:
            raise PrismaError(f"blocks.{i}: weights give an MLP gate but the config says gated_mlp=False")
        _norm(block.attn.q_norm, bw.q_norm, f"blocks.{i}.attn.q_norm")
        _norm(block.attn.k_norm, bw.k_norm, f"blocks.{i}.attn.k_norm")
        _norm(block.attn.norm, bw.attn_norm, f"blocks.{i}.attn.norm")
        _norm(block.mlp.norm, bw.mlp_norm, f"blocks.{i}.mlp.norm")


def _load_rotary(embed, rotary, cfg) -> None:
    if cfg.rotary == "none":
        if rotary is not None:
            raise PrismaError("weights give rotary tables but the config says rotary='none'")
        return
    if rotary is None:
        raise PrismaError(f"the config says rotary={cfg.rotary!r} but the weights give no rotary tables")
    _set(embed.rotary_sin, rotary.sin, "rotary.sin", zero_if_missing=False)
    _set(embed.rotary_cos, rotary.cos, "rotary.cos", zero_if_missing=False)
    embed.rotary_source = rotary.source


def load_into(model, weights: ViTWeights) -> None:
    """Fill `model` (a HookedViT built from the matching config) from processed weights."""
    cfg = model.cfg
    if len(weights.blocks) != cfg.n_layers:
        raise PrismaError(f"weights have {len(weights.blocks)} blocks, config says {cfg.n_layers}")
    embed = model.embed
    _set(embed.proj.weight, weights.patch_w, "patch_embed.weight", zero_if_missing=False)
    _set(embed.proj.bias, weights.patch_b, "patch_embed.bias")
    _norm(embed.norm, weights.patch_norm, "patch_embed.norm")
    prefix = [t.reshape(-1, cfg.d_model) for t in (weights.cls, weights.dist, weights.reg) if t is not None]
    _set(embed.prefix, torch.cat(prefix) if prefix else None, "prefix tokens", zero_if_missing=False)
    _set(embed.pos_embed, weights.pos_embed, "pos_embed", zero_if_missing=False)
    _load_rotary(embed, weights.rotary, cfg)
    if cfg.ln_pre:
        _norm(model.ln_pre, weights.ln_pre, "ln_pre")
    _load_blocks(model.blocks, weights.blocks)
    if cfg.final_norm != "none":
        _norm(model.ln_final, weights.ln_final, "ln_final")
    if cfg.global_pool == "map":
        pool, pw = model.attn_pool, weights.attn_pool
        if pw is None:
            raise PrismaError("global_pool='map' needs attn_pool weights")
        _set(pool.latent, pw.latent.reshape(-1, cfg.d_model), "attn_pool.latent", zero_if_missing=False)
        _linear(pool.q, pw.q_w, pw.q_b, "attn_pool.q")
        _linear(pool.kv, pw.kv_w, pw.kv_b, "attn_pool.kv")
        _linear(pool.proj, pw.proj_w, pw.proj_b, "attn_pool.proj")
        _norm(pool.norm, pw.norm, "attn_pool.norm")
        _linear(pool.mlp.fc1, pw.fc1_w, pw.fc1_b, "attn_pool.mlp.fc1")
        _linear(pool.mlp.fc2, pw.fc2_w, pw.fc2_b, "attn_pool.mlp.fc2")
    if cfg.d_proj:
        _linear(model.proj, weights.proj_w, weights.proj_b, "proj")
    elif weights.proj_w is not None:
        raise PrismaError("weights give an image projection but the config says d_proj=0")
    if cfg.head_type == "module":
        if weights.head_module is None or weights.head_w is not None:
            raise PrismaError("head_type='module' takes the head as ViTWeights.head_module (and no head_w)")
        if cfg.n_dist:
            raise PrismaError("head_type='module' with a distillation token: give both heads as Linear layers")
        model.head = weights.head_module
    elif weights.head_module is not None:
        raise PrismaError("weights give head_module but the config says head_type='linear': set head_type='module'")
    elif model.head is not None:
        _linear(model.head, weights.head_w, weights.head_b, "head")
    elif weights.head_w is not None:
        raise PrismaError("weights give a classifier head but the config says n_classes=0")
    if cfg.n_dist and cfg.n_classes:
        _linear(model.head_dist, weights.head_dist_w, weights.head_dist_b, "head_dist")


def load_text_into(model, weights) -> None:
    """Fill a HookedTextTransformer from processed `TextWeights`."""
    cfg = model.cfg
    if len(weights.blocks) != cfg.n_layers:
        raise PrismaError(f"weights have {len(weights.blocks)} blocks, config says {cfg.n_layers}")
    _set(model.token_embed.weight, weights.token_embed, "token_embed", zero_if_missing=False)
    _set(model.pos_embed, weights.pos_embed, "pos_embed", zero_if_missing=False)
    _load_blocks(model.blocks, weights.blocks)
    _norm(model.ln_final, weights.ln_final, "ln_final")
    if model.proj is not None:
        _linear(model.proj, weights.proj_w, weights.proj_b, "proj")
