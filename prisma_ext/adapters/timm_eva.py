"""Adapter for timm's `Eva` class: EVA-02, DINOv3, Perception Encoder, timm's `vit_*_rope_*` and
the other rotary ViTs timm builds with it (rotary position embeddings of every timm RoPE type,
SwiGLU / packed GLU MLPs with their inner norms, RMSNorm, qk-norm, registers, layer scale)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..hooked.config import ViTConfig
from ..hooked.rotary import RotaryWeights
from ..hooked.weights import BlockWeights, ViTWeights
from .timm_layers import check_mlp, tower_norms
from .timm_vit import TimmViTAdapter, _final_norm, _from_timm

ATTENTION_CLASSES = ("EvaAttention", "AttentionRope")


class TimmRotaryTables(nn.Module):
    """timm's RoPE module as a table source for the hooked model: grid (h, w) -> (sin, cos)
    [tables, h*w, heads, d_head] (hooked/rotary.py's layout), computed exactly as `Eva._pos_embed`
    asks timm's module for them (kept in eval mode: no train-time coordinate jitter)."""

    def __init__(self, rope: nn.Module, dynamic: bool):
        super().__init__()
        self.rope = copy.deepcopy(rope).eval()
        for param in self.rope.parameters():
            param.requires_grad_(False)
        self.dynamic = dynamic

    def train(self, mode: bool = True) -> TimmRotaryTables:
        return super().train(False)

    def forward(self, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        if self.dynamic or not hasattr(self.rope, "feat_shape"):
            table = self.rope.get_embed(shape=list(grid))
        else:
            table = self.rope.get_embed()
        return layout_tables(table)


def layout_tables(table: Tensor) -> tuple[Tensor, Tensor]:
    """timm's concatenated [sin, cos] table, [n, 2 * d_head] (shared by every layer and head) or
    [depth, heads, n, 2 * d_head] (mixed RoPE), -> (sin, cos) [tables, n, heads, d_head]."""
    sin, cos = table.float().chunk(2, dim=-1)
    if table.ndim == 2:
        return sin[None, :, None], cos[None, :, None]
    return sin.transpose(1, 2), cos.transpose(1, 2)


class TimmEvaAdapter(TimmViTAdapter):
    """timm `Eva` (pre-norm blocks; rotary or absolute positions)."""

    name = "timm-eva"

    def matches(self, module: nn.Module) -> bool:
        return _from_timm(module) and type(module).__name__ == "Eva"

    def refusal(self, module: nn.Module) -> str | None:
        return None  # TimmViTAdapter names the other timm classes

    # ---------------------------------------------------------------- checks
    def check(self, m: nn.Module) -> None:
        from timm.layers import PatchEmbed
        from timm.models.eva import EvaBlock

        def refuse(feature: str) -> None:
            raise UnsupportedModelError(f"timm Eva ({self._arch(m)}): {feature} is not supported")

        if type(m.patch_embed) is not PatchEmbed or not isinstance(m.patch_embed.proj, nn.Conv2d):
            refuse(f"patch embedding {type(m.patch_embed).__name__} (a hybrid CNN stem, or a patch embedding "
                   "with its own forward)")
        if m.patch_embed.dynamic_img_pad:
            refuse("dynamic_img_pad (padding images to a multiple of the patch size)")
        if m.global_pool == "map":
            self._check_pool(m.attn_pool, refuse)
        elif m.global_pool in ("avgmax", "max"):
            refuse(f"global_pool={m.global_pool!r} (max pooling is not linear in the tokens)")
        elif m.global_pool not in ("token", "avg"):
            refuse(f"global_pool={m.global_pool!r} (no pooling: the model outputs every token)")
        if not isinstance(m.norm, nn.Identity) and not isinstance(m.fc_norm, nn.Identity):
            refuse("a final norm on the tokens and another after pooling (use_post_transformer_norm with "
                   "use_fc_norm)")
        for i, blk in enumerate(m.blocks):
            kind = type(blk).__name__
            if kind == "EvaBlockPostNorm":
                refuse(f"post-norm blocks (EvaBlockPostNorm, use_post_norm=True; blocks.{i})")
            if type(blk) is not EvaBlock:
                refuse(f"block type {kind} (blocks.{i})")
            attn = blk.attn
            if type(attn).__name__ not in ATTENTION_CLASSES:
                refuse(f"attention type {type(attn).__name__} (blocks.{i})")
            if getattr(attn, "gate", None) is not None:
                refuse("gated attention (a sigmoid gate on the heads' outputs, gated_attn=True)")
            if getattr(attn, "num_kv_groups", 1) != 1:
                refuse(f"grouped-query attention (num_kv_heads={attn.num_kv_heads} for {attn.num_heads} heads; "
                       f"blocks.{i})")
            if attn.num_prefix_tokens != m.num_prefix_tokens:
                refuse(f"blocks.{i}.attn leaves {attn.num_prefix_tokens} tokens unrotated, the model has "
                       f"{m.num_prefix_tokens} prefix tokens")
            if type(attn).__name__ == "AttentionRope" and attn.proj.out_features != m.embed_dim:
                refuse("an attention whose output width differs from the model width (dim_out)")
            check_mlp(blk.mlp, f"blocks.{i}.mlp")
        self.norms(m)

    def norms(self, m: nn.Module):
        named = {"norm_pre": m.norm_pre, "the final norm": _final_norm(m)[1]}
        for i, blk in enumerate(m.blocks):
            named.update({f"blocks.{i}.norm1": blk.norm1, f"blocks.{i}.norm2": blk.norm2,
                          f"blocks.{i}.attn.q_norm": blk.attn.q_norm, f"blocks.{i}.attn.k_norm": blk.attn.k_norm,
                          f"blocks.{i}.attn.norm": blk.attn.norm, f"blocks.{i}.mlp.norm": blk.mlp.norm})
        if m.global_pool == "map":
            named["attn_pool.norm"] = m.attn_pool.norm
        return tower_norms(named)

    # ---------------------------------------------------------------- config
    def config(self, m: nn.Module) -> ViTConfig:
        rotary = "none"
        tables = heads = 1
        if m.rope is not None:
            rotary = "half" if m.blocks[0].attn.rotate_half else "interleaved"
            sin, _ = TimmRotaryTables(m.rope, bool(m.dynamic_img_size))(tuple(m.patch_embed.grid_size))
            tables, heads = sin.shape[0], sin.shape[2]
        return ViTConfig(
            **self._config_fields(m),
            rotary=rotary, rotary_tables=tables, rotary_heads=heads,
            n_reg=m.reg_token.shape[1] if m.reg_token is not None else 0,
            pool_include_prefix=m.global_pool == "map",  # Eva's attention pool reads every token, avg the patches
        )

    # ---------------------------------------------------------------- weights
    def weights(self, m: nn.Module) -> ViTWeights:
        blocks = []
        for blk in m.blocks:
            qkv_w, qkv_b = _qkv(blk.attn)
            blocks.append(BlockWeights(**self._block_fields(blk), qkv_w=qkv_w, qkv_b=qkv_b,
                                       ls1=blk.gamma_1, ls2=blk.gamma_2))
        rotary = None
        if m.rope is not None:
            source = TimmRotaryTables(m.rope, bool(m.dynamic_img_size))
            sin, cos = source(tuple(m.patch_embed.grid_size))
            rotary = RotaryWeights(sin=sin, cos=cos, source=source if m.dynamic_img_size else None)
        return ViTWeights(
            **self._weight_fields(m),
            blocks=blocks,
            dist=None,
            reg=m.reg_token.reshape(-1, m.embed_dim) if m.reg_token is not None else None,
            rotary=rotary,
        )


def _qkv(attn: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(qkv weight [3 * H * d_head, d], bias or None) of an EvaAttention / AttentionRope: fused
    (`qkv`, with EVA's separate q/v biases and its zero k bias) or separate projections."""
    if attn.qkv is not None:
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        return attn.qkv.weight, bias
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([layer.weight for layer in layers])
    if all(layer.bias is None for layer in layers):
        return weight, None
    return weight, torch.cat([layer.bias if layer.bias is not None else torch.zeros_like(layer.weight[:, 0])
                              for layer in layers])


ADAPTERS = [TimmEvaAdapter()]
