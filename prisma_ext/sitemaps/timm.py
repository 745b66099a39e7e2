"""timm `VisionTransformer` / `VisionTransformerDistilled` / `Eva`: HookedViT's site names on timm's
modules.

Semantics are HookedViT's: `hook_attn_out`/`hook_mlp_out` are what the block adds to the residual
stream (after layer scale), `hook_resid_mid` is the input of `norm2` (the residual stream itself,
so an assignment copies into it), the pattern is `attn_drop`'s output with `fused_attn` switched
off for the trace, `z` is `proj`'s input. Eva's rotary attention serves q, k, v and the rotated
queries and keys from a swapped-in forward (`sitemaps.rotary`).
"""

from __future__ import annotations

from torch import nn

from .attention import SwapForward
from .builder import D_MLP, HEADS, PATTERN, POOLED, TOKENS, BlockSites, SiteMap
from .rotary import rotary_attention
from .spec import IDENTITY, Chunk, FlattenGrid, Half, Heads, SetAttr, Site, SwapAxes, Unsqueeze

ROTARY_ATTENTION = ("EvaAttention", "AttentionRope")


def _mlp_sites(p: str, mlp: nn.Module) -> dict[str, Site]:
    """timm's Mlp (fc1, act), SwiGLU (fc1_g the gate, fc1_x the linear branch) and packed GLU (both
    halves of fc1); the gated product is `drop1`'s output; a norm before fc2 is `norm`."""
    kind = type(mlp).__name__
    if kind == "Mlp":
        sites = dict(mlp_pre=Site(f"{p}.fc1", shape=D_MLP), mlp_post=Site(f"{p}.act", shape=D_MLP))
    elif kind == "SwiGLU":
        sites = dict(mlp_pre=Site(f"{p}.fc1_g", shape=D_MLP), mlp_pre_linear=Site(f"{p}.fc1_x", shape=D_MLP),
                     mlp_post=Site(f"{p}.drop1", shape=D_MLP))
    else:  # GluMlp / SwiGLUPacked: x1, x2 = fc1(x).chunk(2); gate_last: x1 * act(x2), else act(x1) * x2
        gate, linear = (1, 0) if mlp.gate_last else (0, 1)
        sites = dict(mlp_pre=Site(f"{p}.fc1", view=Half(gate), shape=D_MLP),
                     mlp_pre_linear=Site(f"{p}.fc1", view=Half(linear), shape=D_MLP),
                     mlp_post=Site(f"{p}.drop1", shape=D_MLP))
    if not isinstance(mlp.norm, nn.Identity):
        sites["mlp_norm"] = Site(f"{p}.norm", shape=D_MLP)
    return sites


def timm_vit_sites(m: nn.Module, prefix: str = "", path: str = "") -> dict[str, Site]:
    """The site map of a timm ViT `m`, in forward order. `prefix`: put before every site name
    (e.g. "visual."); `path`: where `m` sits in the traced root module (e.g. "visual.trunk")."""
    def at(sub: str) -> str:
        return f"{path}.{sub}" if path else sub

    sites = SiteMap(prefix)
    sites.add("hook_patch_embed", Site(at("patch_embed"), view=FlattenGrid() if m.dynamic_img_size else IDENTITY,
                                       shape=TOKENS))
    if not isinstance(m.norm_pre, nn.Identity):
        sites.add("hook_full_embed", Site(at("norm_pre"), "input"))
        sites.add("hook_embed", Site(at("norm_pre")))
    for i, blk in enumerate(m.blocks):
        b, heads = at(f"blocks.{i}"), blk.attn.num_heads
        attn = f"{b}.attn"
        has = {name: not isinstance(getattr(blk.attn, name), nn.Identity) for name in ("q_norm", "k_norm", "norm")}
        if type(blk.attn).__name__ in ROTARY_ATTENTION:
            swap = SwapForward(attn, rotary_attention)
            q, k, v, rot_q, rot_k = (Site(attn, name, shape=HEADS, prepare=swap)
                                     for name in ("q", "k", "v", "rot_q", "rot_k"))
            if getattr(m, "rope", None) is None:
                rot_q = rot_k = None
        else:
            q, k, v = (Site(f"{attn}.qkv", view=Chunk(j, 3, heads), shape=HEADS) for j in range(3))
            rot_q = rot_k = None
        sites.block(i, BlockSites(
            resid_pre=Site(b, "input"), ln1=Site(f"{b}.norm1"), q=q, k=k, v=v, rot_q=rot_q, rot_k=rot_k,
            q_norm=Site(f"{attn}.q_norm", view=SwapAxes(1, 2), shape=HEADS) if has["q_norm"] else None,
            k_norm=Site(f"{attn}.k_norm", view=SwapAxes(1, 2), shape=HEADS) if has["k_norm"] else None,
            pattern=Site(f"{attn}.attn_drop", shape=PATTERN, prepare=SetAttr(attn, "fused_attn", False)),
            z=Site(f"{attn}.norm" if has["norm"] else f"{attn}.proj", "input", Heads(heads), HEADS),
            attn_norm=Site(f"{attn}.norm", shape="[batch, pos, head * d_head]") if has["norm"] else None,
            attn_out=Site(f"{b}.drop_path1"),
            resid_mid=Site(f"{b}.norm2", "input", in_place=True), ln2=Site(f"{b}.norm2"),
            **_mlp_sites(f"{b}.mlp", blk.mlp),
            mlp_out=Site(f"{b}.drop_path2"), resid_post=Site(b)))
    distilled = getattr(m, "dist_token", None) is not None  # its head reads two tokens apart, never fc_norm
    if not distilled and not isinstance(m.fc_norm, nn.Identity):
        sites.add("ln_final.hook_normalized", Site(at("fc_norm"), view=Unsqueeze(1), shape="[batch, 1, d_model]"))
    elif not isinstance(m.norm, nn.Identity):
        sites.add("ln_final.hook_normalized", Site(at("norm")))
    if not distilled:
        sites.add("hook_pooled", Site(at("head"), "input", shape=POOLED))
    return sites.done()
