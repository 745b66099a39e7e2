"""Attention whose pattern (and per-head values) no module ever sees, made readable for a trace.

open_clip's blocks call `nn.MultiheadAttention`, which computes q/k/v, the pattern and the mixed
values `z` inside one functional call (and never calls `out_proj` as a module). Hugging Face
CLIP computes q, k, v and `z` through modules, but its pattern lives inside the attention
function that `config._attn_implementation` picks (SDPA by default: no pattern at all).

For one trace, a site's `prepare` swaps in an explicit computation that hands those values to
nnsight's interleaver under named locations of the attention module (`{path}.qkv`,
`{path}.pattern`, `{path}.z`), where `TracedModel.site` reads and edits them like a module
output. The swap is undone when the trace ends, also when its body raises; outside a trace
nothing changes. open_clip: the body nnsight's controller runs for that one
`nn.MultiheadAttention` is replaced (nnsight keeps it in the module's controller state).
Hugging Face: that one attention module gets a copy of its config naming the attention function
registered here (`prisma_explicit`, eager attention whose pattern is served).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PrismaError
from .spec import Undo

HF_IMPLEMENTATION = "prisma_explicit"


def serve(module: nn.Module, key: str, value: Tensor) -> Tensor:
    """Hand `value` to the trace running over `module` at `{module's path}.{key}`; returns what
    the trace body left there (the value itself, or its edit). Outside a trace: `value`."""
    from nnsight.intervention.source import STATE

    state = module.__dict__.get(STATE)
    if state is None:
        return value
    interleaver, path, _ = state.active()
    return value if interleaver is None else interleaver.handle(f"{path}.{key}", value)


def _controller_state(module: nn.Module, path: str) -> Any:
    from nnsight.intervention.source import STATE

    state = module.__dict__.get(STATE)
    if state is None:
        raise PrismaError(f"{path} is not wrapped by nnsight (no controller): trace the model that "
                          "px.load(..., backend='nnsight') returned")
    return state


@dataclass(frozen=True)
class SwapForward:
    """Prepare a site by running `body(module, *args, **kwargs)` in place of the forward of the
    module at `module` (dotted path) for one trace. The body computes what the module computes and
    hands the values no module sees to the trace with `serve(module, key, value)` (using what it
    returns); a `Site(module, key)` then reads and edits them. For an attention whose softmax is
    inline, say (docs/adapters.md). Returns the undo, or None if already swapped."""

    module: str
    body: Any

    def __call__(self, root: nn.Module) -> Undo | None:
        state = _controller_state(root.get_submodule(self.module), self.module)
        old = state.body
        if old is self.body:
            return None
        state.body = self.body
        return lambda: setattr(state, "body", old)


# ---------------------------------------------------------------------------- open_clip
class MHABody:
    """`nn.MultiheadAttention.forward` for batch-first self-attention, computed step by step.

    Serves `qkv` [batch, pos, 3 * d_model] (after the in-projection), `pattern`
    [batch, head, query, key] (only when `explicit`; else SDPA runs, as torch's own path does)
    and `z` [batch, pos, d_model] (before `out_proj`). Same signature and return as the module's
    forward (attention weights only when asked for and computed).
    """

    def __init__(self, explicit: bool):
        self.explicit = explicit

    def __call__(self, module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                 key_padding_mask: Tensor | None = None, need_weights: bool = True,
                 attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                 is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if not (query is key is value) or key_padding_mask is not None or not module.batch_first \
                or module.in_proj_weight is None or module.bias_k is not None or module.add_zero_attn:
            raise PrismaError("the q/k/v, z and pattern sites of nn.MultiheadAttention need batch-first "
                              "self-attention with one in-projection and no key padding mask")
        batch, pos, d_model = query.shape
        heads = module.num_heads
        qkv = serve(module, "qkv", F.linear(query, module.in_proj_weight, module.in_proj_bias))
        q, k, v = (t.transpose(1, 2) for t in qkv.unflatten(-1, (3, heads, -1)).unbind(2))
        mask = _additive(attn_mask, q.dtype)
        if is_causal and mask is None:
            mask = torch.full((pos, pos), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        p_drop = module.dropout if module.training else 0.0
        pattern = None
        if self.explicit or need_weights:  # read late: a pattern site may switch it on mid-trace
            scores = (q * (d_model // heads) ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            pattern = scores.softmax(dim=-1)
            if self.explicit:
                pattern = serve(module, "pattern", pattern)
            z = F.dropout(pattern, p_drop, module.training) @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        z = serve(module, "z", z.transpose(1, 2).reshape(batch, pos, d_model))
        out = F.linear(z, module.out_proj.weight, module.out_proj.bias)
        if not need_weights:
            return out, None
        return out, pattern.mean(dim=1) if average_attn_weights else pattern


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """nn.MultiheadAttention's mask as an additive float mask (bool: True = not allowed)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


@dataclass(frozen=True)
class ExplicitMHA:
    """Prepare a site of the `nn.MultiheadAttention` at `module` (dotted path): for this trace,
    nnsight's controller runs `MHABody` instead of the module's forward; `pattern=True` also
    asks for the explicit softmax (else SDPA). Returns the undo, or None if already swapped."""

    module: str
    pattern: bool = False

    def __call__(self, root: nn.Module) -> Undo | None:
        state = _controller_state(root.get_submodule(self.module), self.module)
        body = state.body
        if isinstance(body, MHABody):
            body.explicit = body.explicit or self.pattern
            return None
        state.body = MHABody(self.pattern)
        return lambda: setattr(state, "body", body)


# ---------------------------------------------------------------------------- Hugging Face
def explicit_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, scaling: float | None = None,
                       dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """transformers' eager attention ([batch, head, pos, d_head] in, [batch, pos, head, d_head]
    and the pattern out), with the pattern served to the trace at `{path}.pattern`.

    Takes the mask in any form transformers builds it for the model's own implementation: an
    additive float mask (eager), a boolean one (SDPA; True = attend) or none with `is_causal`.
    """
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


def register_hf_attention() -> None:
    """Register `explicit_attention` with transformers as `prisma_explicit` (once; additive:
    no model uses it unless its config names it)."""
    from transformers import AttentionInterface

    if HF_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(HF_IMPLEMENTATION, explicit_attention)


@dataclass(frozen=True)
class ExplicitHFAttention:
    """Prepare the pattern site of the Hugging Face attention module at `module`: for this
    trace it gets a copy of its config naming `prisma_explicit` (only this module switches;
    its tower keeps SDPA). Returns the undo, or None if already switched."""

    module: str

    def __call__(self, root: nn.Module) -> Undo | None:
        register_hf_attention()
        attn = root.get_submodule(self.module)
        config = attn.config
        if config._attn_implementation == HF_IMPLEMENTATION:
            return None
        switched = copy.copy(config)
        switched._attn_implementation = HF_IMPLEMENTATION
        attn.config = switched
        return lambda: setattr(attn, "config", config)
