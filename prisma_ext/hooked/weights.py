"""Canonical ViT weights: the contract between adapters and HookedViT.

Linear weights use torch's `nn.Linear` layout `[out, in]`, since every source does. A missing
bias is `None`. The query/key/value rows of `qkv_w` are stacked as `[q; k; v]`, each
`n_heads * d_head` rows with heads contiguous (timm's and open_clip's layout).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from .rotary import RotaryWeights

Norm = tuple[Tensor, Tensor]  # (weight [d], bias [d]); an RMSNorm's bias is zeros


@dataclass
class BlockWeights:
    """One pre-norm transformer block. `ls1`/`ls2` are layer-scale gammas [d] or None."""

    ln1: Norm | None
    qkv_w: Tensor  # [3 * H * d_head, d]
    qkv_b: Tensor | None  # [3 * H * d_head]
    proj_w: Tensor  # [d, H * d_head]
    proj_b: Tensor | None  # [d]
    ln2: Norm | None
    fc1_w: Tensor  # [d_mlp, d]
    fc1_b: Tensor | None
    fc2_w: Tensor  # [d, d_mlp]
    fc2_b: Tensor | None
    ls1: Tensor | None = None
    ls2: Tensor | None = None
    q_norm: Norm | None = None  # per-head norms of queries and keys [d_head] (qk_norm)
    k_norm: Norm | None = None
    attn_norm: Norm | None = None  # the norm of the heads' outputs before proj [H * d_head]
    gate_w: Tensor | None = None  # a gated MLP's gate [d_mlp, d]: act(gate(x)) * fc1(x)
    gate_b: Tensor | None = None
    mlp_norm: Norm | None = None  # the norm before fc2 [d_mlp]


@dataclass
class AttnPoolWeights:
    """A latent-query attention-pooling head (timm's `AttentionPoolLatent`, SigLIP's `map`)."""

    latent: Tensor  # [latent_len, d]
    q_w: Tensor  # [d, d]
    q_b: Tensor | None
    kv_w: Tensor  # [2 * d, d]
    kv_b: Tensor | None
    proj_w: Tensor  # [d, d]
    proj_b: Tensor | None
    norm: Norm | None
    fc1_w: Tensor
    fc1_b: Tensor | None
    fc2_w: Tensor
    fc2_b: Tensor | None
    eps: float = 1e-6


@dataclass
class ViTWeights:
    """All parameters of a ViT classifier in canonical form.

    `pos_embed` is [n_pos, d]: rows for the prefix tokens first when the config's
    `pos_embed_on_prefix` is set, then one row per patch of the config's grid, row-major.
    """

    patch_w: Tensor  # [d, in_chans, ph, pw]
    patch_b: Tensor | None
    cls: Tensor | None  # [d]
    dist: Tensor | None  # [d]
    reg: Tensor | None  # [n_reg, d]
    pos_embed: Tensor | None
    ln_pre: Norm | None
    blocks: list[BlockWeights]
    ln_final: Norm | None
    head_w: Tensor | None  # [n_classes, d]
    head_b: Tensor | None
    head_dist_w: Tensor | None = None
    head_dist_b: Tensor | None = None
    attn_pool: AttnPoolWeights | None = None
    proj_w: Tensor | None = None  # [d_proj, d]: CLIP's image projection, applied before the head
    proj_b: Tensor | None = None
    head_module: nn.Module | None = None  # any head after pooling ([..., d] -> [..., n_classes]), instead of head_w
    patch_norm: Norm | None = None  # a norm on the patch tokens inside the patch embedding
    rotary: RotaryWeights | None = None  # rotary angle tables (cfg.rotary != "none")


@dataclass
class TextWeights:
    """A CLIP text tower in canonical form."""

    token_embed: Tensor  # [vocab, d]
    pos_embed: Tensor  # [context_length, d]
    blocks: list[BlockWeights]
    ln_final: Norm | None
    proj_w: Tensor | None  # [d_proj, d]
    proj_b: Tensor | None = None


def _map_tensors(obj, fn):
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, nn.Module):  # a head module: a copy, so the source keeps its own
        import copy

        module = copy.deepcopy(obj)
        for param in module.parameters():
            param.requires_grad_(False)
        return module
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return type(obj)(**{f.name: _map_tensors(getattr(obj, f.name), fn) for f in fields(obj)})
    return obj


def detached_copy(weights: ViTWeights, dtype: torch.dtype | None = None) -> ViTWeights:
    """A deep copy with every tensor detached and cloned (optionally cast to `dtype`)."""

    def copy(t: Tensor) -> Tensor:
        t = t.detach().clone()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    return _map_tensors(weights, copy)
