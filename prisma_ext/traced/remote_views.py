"""What a remote trace needs to cut a TL site out of a module's raw value, with only torch,
transformers and nnsight on the server (this module imports nothing of prisma-ext and is
shipped by value with each request: `remote_envoy.ship_by_value`).

A view is plain data, a tuple `(kind, *params)`, translated client-side from the site map's
`sitemaps.spec` views (`traced.remote.wire_view`); `read_view` / `write_view` mirror those
classes' `read` / `write`:

    ("identity",)                      the raw tensor is the site
    ("heads", n_heads)                 [..., n_heads * d_head] <-> [..., n_heads, d_head]
    ("chunk", index, n_chunks, n_heads) a fused qkv output -> q, k or v [batch, pos, head, d_head]
    ("swap_axes", a, b)                two axes swapped
    ("half", index)                    one half of the last axis
    ("unsqueeze", dim)                 [batch, d] <-> [batch, 1, d]
    ("tuple_item", index)              item `index` of a tuple output (a bare tensor passes through)
    ("conv_tokens",)                   [batch, d, rows, cols] <-> [batch, rows * cols, d]
    ("flatten_grid",)                  [batch, rows, cols, d] <-> [batch, rows * cols, d]

The attention pattern of a Hugging Face attention module is computed inside the attention
function its config names (SDPA by default: no pattern at all). `explicit_attention_on(attn)`
switches that one module, for one trace, to `explicit_attention` (eager attention that serves
its pattern to the trace at `{path}.pattern`), registered with transformers under
`EXPLICIT_ATTENTION` only while it is in use; the undo puts both back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

View = tuple
EXPLICIT_ATTENTION = "px_remote_explicit"


def read_view(view: View, raw: Any) -> Tensor:
    """The site (TL layout) in the raw value `raw` of its module, a view of it where possible."""
    kind = view[0]
    if kind == "identity":
        return raw
    if kind == "heads":
        return raw.unflatten(-1, (view[1], -1))
    if kind == "chunk":
        _, index, n_chunks, n_heads = view
        return raw.unflatten(-1, (n_chunks, n_heads, -1)).select(-3, index)
    if kind == "swap_axes":
        return raw.transpose(view[1], view[2])
    if kind == "half":
        return raw.chunk(2, dim=-1)[view[1]]
    if kind == "unsqueeze":
        return raw.unsqueeze(view[1])
    if kind == "tuple_item":
        return raw[view[1]] if isinstance(raw, (tuple, list)) else raw
    if kind == "conv_tokens":
        return raw.flatten(2).transpose(1, 2)
    if kind == "flatten_grid":
        return raw.flatten(1, 2)
    raise ValueError(f"unknown site view {view!r}")


def write_view(view: View, value: Tensor, raw: Any) -> Any:
    """What goes back into the model in place of `raw` when the site's value is `value`."""
    kind = view[0]
    if kind == "identity":
        return value
    if kind in ("heads", "conv_tokens", "flatten_grid"):
        return value.transpose(1, 2).reshape(raw.shape) if kind == "conv_tokens" else value.reshape(raw.shape)
    if kind == "chunk":
        _, index, n_chunks, n_heads = view
        parts = list(raw.unflatten(-1, (n_chunks, n_heads, -1)).unbind(-3))
        parts[index] = value
        return torch.stack(parts, dim=-3).flatten(-3)
    if kind == "swap_axes":
        return value.transpose(view[1], view[2])
    if kind == "half":
        halves = list(raw.chunk(2, dim=-1))
        halves[view[1]] = value
        return torch.cat(halves, dim=-1)
    if kind == "unsqueeze":
        return value.squeeze(view[1])
    if kind == "tuple_item":
        if not isinstance(raw, (tuple, list)):
            return value
        items = list(raw)
        items[view[1]] = value
        return tuple(items) if isinstance(raw, tuple) else items
    raise ValueError(f"unknown site view {view!r}")


# ---------------------------------------------------------------------------- attention
def serve(module: nn.Module, key: str, value: Tensor) -> Tensor:
    """Hand `value` to the trace running over `module` at `{its path}.{key}`; returns what the
    trace body left there (the value or its edit). Outside a trace: `value`."""
    from nnsight.intervention.source import STATE

    state = module.__dict__.get(STATE)
    if state is None:
        return value
    interleaver, path, _ = state.active()
    return value if interleaver is None else interleaver.handle(f"{path}.{key}", value)


def explicit_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, scaling: float | None = None,
                       dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """transformers' eager attention (q, k, v [batch, head, pos, d_head] in; out [batch, pos,
    head, d_head] and the pattern [batch, head, query, key] out), the pattern served to the
    trace at `{path}.pattern`. The mask may come in any form transformers builds for the
    model's own implementation: additive float (eager), boolean (SDPA; True = attend) or none."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    else:  # transformers' SDPA rule: causal when asked (or the module says so) and q_len > 1
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        q_len, k_len = query.shape[-2], key.shape[-2]
        if causal and q_len > 1:
            future = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).triu(1 + k_len - q_len)
            scores = scores.masked_fill(future, float("-inf"))
    pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = serve(module, "pattern", pattern)
    mixed = torch.matmul(F.dropout(pattern, p=dropout, training=module.training), value)
    return mixed.transpose(1, 2).contiguous(), pattern


def explicit_attention_on(attn: nn.Module) -> Callable[[], None] | None:
    """Switch the Hugging Face attention module `attn` to `explicit_attention` (a copy of its
    config naming it; its tower keeps its own) and register that function with transformers
    if it is not already. Returns the undo (config and registry as they were), or None when
    `attn` is already switched."""
    from transformers import AttentionInterface

    config = getattr(attn, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise TypeError(f"{type(attn).__name__} has no transformers config naming its attention "
                        "implementation, so its pattern cannot be served")
    if config._attn_implementation == EXPLICIT_ATTENTION:
        return None
    registry = AttentionInterface._global_mapping
    before = registry.get(EXPLICIT_ATTENTION)
    AttentionInterface.register(EXPLICIT_ATTENTION, explicit_attention)
    switched = copy.copy(config)
    switched._attn_implementation = EXPLICIT_ATTENTION
    attn.config = switched

    def undo() -> None:
        attn.config = config
        if before is None:
            registry.pop(EXPLICIT_ATTENTION, None)
        else:
            registry[EXPLICIT_ATTENTION] = before
    return undo
