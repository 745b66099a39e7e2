"""Attention heads at a glance: each head's patterns, what the readout query attends to, and a
few statistics with a rough type per head (figures: `prisma_ext.viz.heads`).

    patterns = px.head_patterns(model, images, mean=False)   # values [batch, layer, head, query, key]
    stats = px.head_statistics(patterns)                       # values [layer, head, statistic]
    stats.to_dataframe()                                       # one row per head, with its type
    readout = px.readout_attention(model, images)              # values [layer, head, patch]

Statistics over the patch queries (each row sums to 1 over all keys), per image, then averaged
over images and queries (averaging patterns first would blur a head that follows the content
into a uniform one):
- `to_prefix`: attention on prefix tokens (CLS, registers): a head that parks attention there
  is a "sink" head (it mostly does nothing to the patches);
- `to_self`: attention on the query's own token (the diagonal);
- `entropy`: the row's entropy over keys divided by log(n_keys): 1 is uniform;
- `distance`: mean distance in patches from query to key (patch keys only, renormalised),
  divided by the same mean under uniform attention: well below 1 is local, about 1 is global.
`type` applies, in order: sink (to_prefix >= 0.5), self (to_self >= 0.4), local
(distance <= 0.5), global (entropy >= 0.85), else content (attends to chosen patches wherever
they are). The thresholds are rules of thumb for a first look, not a classification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from .backend import Backend
from .common import NO_TARGET, check_batch, in_chunks, layout_for
from .result import AnalysisResult

HEAD_TYPES = ("sink", "self", "local", "global", "content")
STATISTICS = ("to_prefix", "to_self", "entropy", "distance")


def head_patterns(model: Any, images: Tensor, *, mean: bool = True, batch_size: int | None = None,
                  progress: bool = False) -> AnalysisResult:
    """Every head's attention pattern: values [layer, head, query, key] averaged over the batch,
    or with `mean=False` per image [batch, layer, head, query, key]."""
    backend = Backend.of(model)

    def run(x: Tensor, _) -> AnalysisResult:
        sites = [f"blocks.{i}.attn.hook_pattern" for i in range(backend.cfg.n_layers)]
        with torch.no_grad():
            acts = backend.run(x, read=sites).acts
        values = torch.stack([acts[s].float() for s in sites], dim=1).cpu()
        return AnalysisResult("head_patterns", values, ("batch", "layer", "head", "query", "key"),
                              layout_for(backend, x), backend.class_names, {}, {"backend": backend.kind})

    per_image = in_chunks(backend, images, NO_TARGET, batch_size, progress, "head_patterns", run)
    return per_image.mean_over("batch") if mean else per_image


def readout_attention(model: Any, images: Tensor, *, patterns: AnalysisResult | None = None) -> AnalysisResult:
    """What the readout's query sees, averaged over the batch: values [layer, head, patch], the
    CLS row of each pattern (an average-pool model: the mean over the pooled queries; SigLIP:
    weighted by its attention pool), prefix keys dropped. `patterns`: head_patterns' batch mean,
    if already computed."""
    check_batch(images, "readout_attention")
    backend = Backend.of(model)
    patterns = head_patterns(model, images) if patterns is None else patterns
    final = f"blocks.{backend.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        resid = backend.run(images, read=[final]).acts[final]
        weights = backend.readout.query_weights(resid).float().mean(0).cpu()  # [query]
    layout = layout_for(backend, images)
    rows = torch.einsum("q,lhqk->lhk", weights, _values(patterns, "layer", "head", "query", "key"))
    values = rows[..., layout.n_prefix:layout.n_prefix + layout.n_patches]
    return AnalysisResult("readout_attention", values, ("layer", "head", "patch"), layout, backend.class_names,
                          {}, {"backend": backend.kind})


def _values(result: AnalysisResult | Tensor, *dims: str) -> Tensor:
    """A result's values with exactly these axes (a tensor passes as it is)."""
    if isinstance(result, Tensor):
        return result
    if result.dims != dims:
        raise InputError(f"expected a result with axes {dims}, got {result.dims}")
    return result.values


def _patch_distances(layout) -> Tensor:
    rows, cols = layout.grid
    yy, xx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], -1).float()
    return torch.cdist(pos, pos)  # [patch, patch]


def head_type(to_prefix: float, to_self: float, entropy: float, distance: float) -> str:
    """The rough type of a head from its statistics (see the module docstring)."""
    if to_prefix >= 0.5:
        return "sink"
    if to_self >= 0.4:
        return "self"
    if distance <= 0.5:
        return "local"
    if entropy >= 0.85:
        return "global"
    return "content"


@dataclass(repr=False)
class HeadStatistics(AnalysisResult):
    """values [layer, head, statistic] (`STATISTICS`); `types` [layer][head] the rough type of each
    head; `to_dataframe()` one row per head: layer, head, the statistics, type."""

    @property
    def types(self) -> list[list[str]]:
        return self.meta["types"]

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for layer in range(self.values.shape[0]):
            for head in range(self.values.shape[1]):
                rows.append([layer, head, *self.values[layer, head].tolist(), self.types[layer][head]])
        return pd.DataFrame(rows, columns=["layer", "head", *STATISTICS, "type"])


def head_statistics(patterns: AnalysisResult | Tensor, layout=None) -> HeadStatistics:
    """Per head: to_prefix, to_self, entropy, distance and a rough type (see the module docstring).
    `patterns`: `head_patterns(..., mean=False)` (per image, the better input) or its batch mean,
    or such a tensor [batch, layer, head, query, key] / [layer, head, query, key] with `layout`."""
    if isinstance(patterns, AnalysisResult):
        layout = patterns.layout
        values = patterns.values if "batch" in patterns.dims else patterns.values[None]
    elif isinstance(patterns, Tensor) and layout is not None:
        values = patterns if patterns.ndim == 5 else patterns[None]
    else:
        raise InputError("head_statistics takes head_patterns' result, or a pattern tensor and its layout")
    first, n = layout.n_prefix, layout.n_patches
    queries = values[..., first:first + n, :]  # patch queries, all keys [B, L, H, q, k]
    to_prefix = queries[..., :first].sum(-1)
    to_self = torch.diagonal(queries[..., first:first + n], dim1=-2, dim2=-1)
    entropy = -(queries * queries.clamp_min(1e-12).log()).sum(-1) / np.log(values.shape[-1])
    patch_keys = queries[..., first:first + n]
    patch_keys = patch_keys / patch_keys.sum(-1, keepdim=True).clamp_min(1e-12)
    dist = _patch_distances(layout)
    distance = (patch_keys * dist).sum(-1) / dist.mean().clamp_min(1e-12)
    stats = torch.stack([t.mean((0, -1)) for t in (to_prefix, to_self, entropy, distance)], dim=-1)  # [L, H, 4]
    types = [[head_type(*stats[layer, head].tolist()) for head in range(stats.shape[1])]
             for layer in range(stats.shape[0])]
    return HeadStatistics("head_statistics", stats, ("layer", "head", "statistic"), layout, None,
                          {"statistic": list(STATISTICS)}, {"types": types})


# ------------------------------------------------------------------ the previous release's forms
def legacy_head_patterns(model: Any, images: Tensor, mean: bool = True) -> Tensor:
    """`prisma_ext.viz.heads.head_patterns`: the tensor of `head_patterns(...).values`."""
    return head_patterns(model, images, mean=mean).values


def legacy_head_stats(patterns: Tensor, layout) -> Any:
    """`prisma_ext.viz.heads.head_stats`: the DataFrame of `head_statistics(...)`."""
    return head_statistics(patterns, layout).to_dataframe()


def legacy_readout_attention(model: Any, images: Tensor, patterns: Tensor | None = None) -> Tensor:
    """`prisma_ext.viz.heads.readout_attention`: the tensor of `readout_attention(...).values`."""
    return readout_attention(model, images, patterns=patterns).values
