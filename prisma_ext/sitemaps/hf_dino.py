"""Hugging Face DINOv2 (with or without registers), DINOv3 ViT and DeiT: HookedViT's site names on
the transformers modules.

DINOv2 / DINOv3 layers (`norm1`, `attention.{q,k,v,o}_proj`, `layer_scale1`, `norm2`, `mlp`,
`layer_scale2`): `hook_attn_out` / `hook_mlp_out` are the layer scales' outputs (what is added to
the residual stream; the layer's one `drop_path` module serves both branches, so it cannot be a
site); the gated MLPs' `hook_post` is `down_proj`'s input. DINOv3 rotates q and k inline
(`apply_rotary_pos_emb`), so `hook_rot_q` / `hook_rot_k` come from a swapped-in forward that
runs the attention step by step (`dinov3_attention`). DeiT's layers are transformers 5's ViT
layers (`sitemaps.hf`). The pattern is served by `prisma_explicit` (`ExplicitHFAttention`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .attention import ExplicitHFAttention, SwapForward, serve
from .builder import D_MLP, HEADS, PATTERN, TOKENS, BlockSites, SiteMap
from .hf import hf_vit_sites
from .spec import ConvTokens, Heads, Site


def dinov3_attention(module: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                     position_embeddings: tuple[Tensor, Tensor] | None = None, **kwargs: Any) -> tuple:
    """`DINOv3ViTAttention.forward`, serving the rotated queries and keys `rot_q` / `rot_k`
    [batch, pos, head, d_head] (prefix tokens unrotated); q, k, v stay the projections' outputs and
    the attention function is the one the module's config names (the pattern site switches it)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb, eager_attention_forward

    batch, pos, _ = hidden_states.shape
    q, k, v = (proj(hidden_states).view(batch, pos, module.num_heads, module.head_dim).transpose(1, 2)
               for proj in (module.q_proj, module.k_proj, module.v_proj))
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    q = serve(module, "rot_q", q.transpose(1, 2)).transpose(1, 2)
    k = serve(module, "rot_k", k.transpose(1, 2)).transpose(1, 2)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
    out, weights = attention(module, q, k, v, attention_mask, dropout=module.dropout if module.training else 0.0,
                             scaling=module.scaling, **kwargs)
    return module.o_proj(out.reshape(batch, pos, -1).contiguous()), weights


def _mlp_sites(p: str, mlp: nn.Module) -> dict[str, Site]:
    """DINOv2's MLP (fc1, activation_fn) and SwiGLU FFN, DINOv3's MLP (up_proj, act_fn) and gated
    MLP (gate_proj the gate, up_proj the linear branch; their product is down_proj's input)."""
    if hasattr(mlp, "gate_proj"):
        return dict(mlp_pre=Site(f"{p}.gate_proj", shape=D_MLP), mlp_pre_linear=Site(f"{p}.up_proj", shape=D_MLP),
                    mlp_post=Site(f"{p}.down_proj", "input", shape=D_MLP))
    fc1, act = ("fc1", "activation_fn") if hasattr(mlp, "fc1") else ("up_proj", "act_fn")
    return dict(mlp_pre=Site(f"{p}.{fc1}", shape=D_MLP), mlp_post=Site(f"{p}.{act}", shape=D_MLP))


def _dino_layers(sites: SiteMap, path: str, layers: nn.ModuleList, rotary: bool) -> None:
    for i, layer in enumerate(layers):
        p, attn = f"{path}.{i}", f"{path}.{i}.attention"
        heads = getattr(layer.attention, "num_heads", None) or layer.attention.num_attention_heads
        q, k, v = (Site(f"{attn}.{x}_proj", view=Heads(heads), shape=HEADS) for x in "qkv")
        rot_q = rot_k = None
        if rotary:
            swap = SwapForward(attn, dinov3_attention)
            rot_q, rot_k = (Site(attn, name, shape=HEADS, prepare=swap) for name in ("rot_q", "rot_k"))
        sites.block(i, BlockSites(
            resid_pre=Site(p, "input"), ln1=Site(f"{p}.norm1"), q=q, k=k, v=v, rot_q=rot_q, rot_k=rot_k,
            pattern=Site(attn, "pattern", shape=PATTERN, prepare=ExplicitHFAttention(attn)),
            z=Site(f"{attn}.o_proj", "input", Heads(heads), HEADS), attn_out=Site(f"{p}.layer_scale1"),
            resid_mid=Site(f"{p}.norm2", "input", in_place=True), ln2=Site(f"{p}.norm2"),
            **_mlp_sites(f"{p}.mlp", layer.mlp), mlp_out=Site(f"{p}.layer_scale2"), resid_post=Site(p)))


def hf_dinov2_sites(model: nn.Module) -> dict[str, Site]:
    """`Dinov2Model` / `Dinov2WithRegistersModel`: the patch embedding (flattened tokens), the
    layers, the final `layernorm` on every token. The pooled class token is sliced inline."""
    sites = SiteMap()
    sites.add("hook_patch_embed", Site("embeddings.patch_embeddings", shape=TOKENS))
    _dino_layers(sites, "encoder.layer", model.encoder.layer, rotary=False)
    sites.add("ln_final.hook_normalized", Site("layernorm"))
    return sites.done()


def hf_dinov3_sites(model: nn.Module) -> dict[str, Site]:
    """`DINOv3ViTModel`: the patch convolution's tokens, the rotary layers (`model.layer`), the
    final `norm` on every token."""
    sites = SiteMap()
    sites.add("hook_patch_embed", Site("embeddings.patch_embeddings", view=ConvTokens(), shape=TOKENS))
    _dino_layers(sites, "model.layer", model.model.layer, rotary=True)
    sites.add("ln_final.hook_normalized", Site("norm"))
    return sites.done()


def hf_deit_sites(model: nn.Module) -> dict[str, Site]:
    """`DeiTForImageClassification`, `DeiTForImageClassificationWithTeacher`, `DeiTModel`: ViT's
    layout (`sitemaps.hf.hf_vit_sites`). The pooled class token is the classifier's input (or the
    pooler's); the distilled model's two pooled tokens go to two heads, so it has no `hook_pooled`."""
    return hf_vit_sites(model, encoder="deit")
