"""Site specs: where a TransformerLens site lives in a source module and how to cut it out.

A `Site` names a submodule (dotted path from the root module), a port (its "output", its
"input": the first positional argument, or a named value that a swapped-in forward serves, e.g.
the attention pattern of open_clip's `nn.MultiheadAttention`, see `sitemaps.attention`) and a
`View` that turns that raw tensor into the TL layout and back. A site map is an ordered
`{tl_name: Site}` dict, built with `sitemaps.builder.SiteMap`; adapters return one from
`Adapter.site_map` and the nnsight backend reads and writes through it. Nothing here imports
nnsight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

Port = Literal["output", "input"] | str  # any other name: a value served by a swapped forward
Undo = Callable[[], None]


class View:
    """The identity: the raw tensor is the site. Subclasses map `raw` <-> TL layout.

    `read(raw)` returns the site (a view of `raw` where possible); `write(value, raw)` returns
    what goes back into the model in place of `raw` (used for assignments, and to put the site
    itself in the graph so that edits to it and its `.grad` are real).
    """

    identity = True

    def read(self, raw: Tensor) -> Tensor:
        return raw

    def write(self, value: Tensor, raw: Tensor) -> Tensor:
        return value


IDENTITY = View()


@dataclass(frozen=True)
class Heads(View):
    """[..., n_heads * d_head] <-> [..., n_heads, d_head] (e.g. `z` at the output projection)."""

    n_heads: int
    identity = False

    def read(self, raw: Tensor) -> Tensor:
        return raw.unflatten(-1, (self.n_heads, -1))

    def write(self, value: Tensor, raw: Tensor) -> Tensor:
        return value.reshape(raw.shape)


@dataclass(frozen=True)
class Chunk(View):
    """One of `n_chunks` equal chunks of the last axis, split into heads: a fused qkv output
    [batch, pos, 3 * n_heads * d_head] -> q, k or v [batch, pos, n_heads, d_head]."""

    index: int
    n_chunks: int
    n_heads: int
    identity = False

    def _split(self, raw: Tensor) -> Tensor:
        return raw.unflatten(-1, (self.n_chunks, self.n_heads, -1))

    def read(self, raw: Tensor) -> Tensor:
        return self._split(raw).select(-3, self.index)

    def write(self, value: Tensor, raw: Tensor) -> Tensor:
        import torch

        parts = list(self._split(raw).unbind(-3))
        parts[self.index] = value
        return torch.stack(parts, dim=-3).flatten(-3)


@dataclass(frozen=True)
class SwapAxes(View):
    """Two axes swapped: timm's per-head [batch, head, pos, d_head] <-> TL's [batch, pos, head, d_head]."""

    a: int = 1
    b: int = 2
    identity = False

    def read(self, raw: Tensor) -> Tensor:
        return raw.transpose(self.a, self.b)

    def write(self, value: Tensor, raw: Tensor) -> Tensor:
        return value.transpose(self.a, self.b)


@dataclass(frozen=True)
class Half(View):
    """One half of the last axis: a packed gated MLP's fc1 output [..., 2 * d_mlp] -> [..., d_mlp]."""

    index: int
    identity = False

    def read(self, raw: Tensor) -> Tensor:
        return raw.chunk(2, dim=-1)[self.index]

    def write(self, value: Tensor, raw: Tensor) -> Tensor:
        import torch

        halves = list(raw.chunk(2, dim=-1))
        halves[self.index] = value
        return torch.cat(halves, dim=-1)


@dataclass(frozen=True)
class Unsqueeze(View):
    """A pooled vector [batch, d] seen as one token [batch, 1, d] (TL's pooled ln_final)."""

    dim: int = 1
    identity = False

    def read(self, raw: Tensor) -> Tensor:
        return raw.unsqueeze(self.dim)

    def write(self, value: Tensor, raw: Tensor) -> Tensor:
        return value.squeeze(self.dim)


@dataclass(frozen=True)
class TupleItem(View):
    """Item `index` of a module's tuple output (Hugging Face attention returns (out, weights));
    a bare tensor passes through (layers that return one in newer transformers)."""

    index: int = 0
    identity = False

    def read(self, raw) -> Tensor:
        return raw[self.index] if isinstance(raw, (tuple, list)) else raw

    def write(self, value: Tensor, raw):
        if not isinstance(raw, (tuple, list)):
            return value
        items = list(raw)
        items[self.index] = value
        return tuple(items) if isinstance(raw, tuple) else items


@dataclass(frozen=True)
class ConvTokens(View):
    """A patch convolution's output [batch, d, rows, cols] <-> tokens [batch, rows * cols, d]."""

    identity = False

    def read(self, raw: Tensor) -> Tensor:
        return raw.flatten(2).transpose(1, 2)

    def write(self, value: Tensor, raw: Tensor) -> Tensor:
        return value.transpose(1, 2).reshape(raw.shape)


@dataclass(frozen=True)
class FlattenGrid(View):
    """Channels-last patches [batch, rows, cols, d] <-> tokens [batch, rows * cols, d]."""

    identity = False

    def read(self, raw: Tensor) -> Tensor:
        return raw.flatten(1, 2)

    def write(self, value: Tensor, raw: Tensor) -> Tensor:
        return value.reshape(raw.shape)


@dataclass(frozen=True)
class SetAttr:
    """Prepare a site by setting `module.<attr> = value` on a submodule for one trace (e.g.
    timm's `fused_attn = False`, so the attention pattern exists as a module output).
    Returns the undo, or None when nothing changed."""

    module: str
    attr: str
    value: object

    def __call__(self, root: nn.Module) -> Undo | None:
        target = root.get_submodule(self.module)
        old = getattr(target, self.attr)
        if old == self.value:
            return None
        setattr(target, self.attr, self.value)
        return lambda: setattr(target, self.attr, old)


@dataclass(frozen=True)
class Site:
    """A TL site inside a source module.

    `module`: dotted path of the submodule ("" for the root); `port`: its "output", "input"
    (first positional argument) or the name of a value its swapped-in forward serves (set up by
    `prepare`, e.g. "pattern"); `view`: raw tensor <-> TL layout; `shape`: the TL shape, for
    docs and errors; `in_place`: an assignment copies into the live tensor instead of replacing
    it, because the forward pass also reads that tensor elsewhere (a residual stream that is
    both a norm's input and the skip connection; the view must share storage with it);
    `prepare`: run before the site is read, once per trace (returns an undo that runs when the
    trace ends); `copy`: the trace reads a copy of the value and the model goes on with a copy of
    what the trace body left there, for a module that changes the value in place later in its
    forward (`out += x`: without it, what was read would become the sum).
    """

    module: str
    port: Port = "output"
    view: View = IDENTITY
    shape: str = "[batch, pos, d_model]"
    in_place: bool = False
    prepare: Callable[[nn.Module], Undo | None] | None = None
    copy: bool = False


# TL sites the nnsight backend leaves out, by their last component, with the reason.
NOT_MAPPED = {
    "hook_attn_scores": "the pre-softmax scores are computed inline, not by a module",
    "hook_result": "per-head outputs are never materialised by the source model",
    "hook_scale": "LayerNorm's scale is computed inside the fused norm kernel",
    "hook_pos_embed": "position embeddings are added inline to the tokens (a parameter, not an "
                      "activation); read blocks.0.hook_resid_pre for their sum",
    "hook_embed": "without a pre-norm the tokens are only materialised with positions added; "
                  "read hook_patch_embed or blocks.0.hook_resid_pre",
    "hook_pooled": "the source slices or averages the pooled token inline (no module sees it); read "
                   "the final residual stream or ln_final.hook_normalized",
    "hook_text_embed": "the text projection is a Parameter applied inline (x @ text_projection), not "
                       "a module; read text.ln_final.hook_normalized",
}
