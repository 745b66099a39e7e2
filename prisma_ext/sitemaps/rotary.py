"""timm's rotary attention (`EvaAttention`, `AttentionRope`), made readable for a trace.

EVA's attention computes q, k and v with `F.linear` when it has its separate q/v biases (its qkv
module is never called), and rotates q and k inline: no module sees q, k, v or the rotated
queries and keys. For one trace, `SwapForward(path, ROTARY_BODY)` runs the same computation step
by step and serves them under the attention module's path: `q`, `k`, `v` (after the projections)
and `rot_q`, `rot_k` (after qk-norm and the rotation), each [batch, pos, head, d_head], TL's
layout. Everything else stays on the module's own submodules (`q_norm`, `k_norm`, `attn_drop`
for the pattern with `fused_attn` off, `norm`, `proj`), so the other sites read as they do
without the swap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import serve


def _heads(t: Tensor, n_heads: int) -> Tensor:
    """[batch, pos, n_heads * d_head] -> [batch, pos, head, d_head]."""
    return t.unflatten(-1, (n_heads, -1))


def _projections(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [batch, pos, head, d_head] as the module computes them."""
    heads = module.num_heads
    if module.qkv is None:
        return (_heads(module.q_proj(x), heads), _heads(module.k_proj(x), heads), _heads(module.v_proj(x), heads))
    if getattr(module, "q_bias", None) is not None:
        qkv = F.linear(x, module.qkv.weight, torch.cat((module.q_bias, module.k_bias, module.v_bias)))
    else:
        qkv = module.qkv(x)
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).unbind(-3)
    return q, k, v


def rotary_attention(module: nn.Module, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                     is_causal: bool = False) -> Tensor:
    """`EvaAttention.forward` / `AttentionRope.forward` (no gate, no grouped queries: the adapter
    refuses those), serving q, k, v, rot_q and rot_k."""
    from timm.layers import apply_rot_embed_cat, maybe_add_mask, resolve_self_attn_mask

    batch, pos, _ = x.shape
    q, k, v = (serve(module, name, t) for name, t in zip("qkv", _projections(module, x)))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head], as timm rotates
    q, k = module.q_norm(q), module.k_norm(k)
    if rope is not None:
        npt, half = module.num_prefix_tokens, getattr(module, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        q = serve(module, "rot_q", q.transpose(1, 2)).transpose(1, 2)
        k = serve(module, "rot_k", k.transpose(1, 2)).transpose(1, 2)
    if module.fused_attn:
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=module.attn_drop.p if module.training else 0.0)
    else:
        scores = (q * module.scale) @ k.transpose(-2, -1)
        scores = maybe_add_mask(scores, resolve_self_attn_mask(pos, scores, attn_mask, is_causal=is_causal))
        z = module.attn_drop(scores.softmax(dim=-1)) @ v
    z = z.transpose(1, 2).reshape(batch, pos, -1)
    return module.proj_drop(module.proj(module.norm(z)))
