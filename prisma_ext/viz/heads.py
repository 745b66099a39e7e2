"""Attention heads at a glance: each head's patterns, a few statistics, a rough type, a gallery.

    patterns = head_patterns(model, images, mean=False)   # [batch, layer, head, query, key]
    stats = head_stats(patterns, model.layout)            # DataFrame: one row per head
    fig = head_gallery(readout_attention(model, images), model.layout, stats)

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

from typing import Any

import numpy as np
import torch
from torch import Tensor

HEAD_TYPES = ("sink", "self", "local", "global", "content")


def head_patterns(model: Any, images: Tensor, mean: bool = True) -> Tensor:
    """Every head's attention pattern: [layer, head, query, key] averaged over the batch, or
    with `mean=False` per image [batch, layer, head, query, key]."""
    from ..analysis.backend import Backend

    backend = Backend.of(model)
    sites = [f"blocks.{i}.attn.hook_pattern" for i in range(backend.cfg.n_layers)]
    with torch.no_grad():
        run = backend.run(images, read=sites)
    patterns = torch.stack([run.acts[s].float() for s in sites], dim=1).cpu()
    return patterns.mean(0) if mean else patterns


def readout_attention(model: Any, images: Tensor, patterns: Tensor | None = None) -> Tensor:
    """What the readout's query sees [layer, head, n_patches], averaged over the batch: the CLS
    row of each pattern (an average-pool model: the mean over the pooled queries; SigLIP:
    weighted by its attention pool), prefix keys dropped. `patterns`: head_patterns' batch mean."""
    from ..analysis.backend import Backend
    from ..analysis.readout import query_weights

    backend = Backend.of(model)
    cfg = backend.cfg
    patterns = head_patterns(model, images) if patterns is None else patterns
    final = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        resid = backend.run(images, read=[final]).acts[final]
        weights = query_weights(backend.vit, resid).float().mean(0).cpu()  # [query]
    layout = backend.layout.for_image(*images.shape[-2:])
    rows = torch.einsum("q,lhqk->lhk", weights, patterns)
    return rows[..., layout.n_prefix:layout.n_prefix + layout.n_patches]


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


def head_stats(patterns: Tensor, layout) -> Any:
    """One row per head: layer, head, to_prefix, to_self, entropy, distance, type (a DataFrame).
    `patterns`: [batch, layer, head, query, key] (per image, as `head_patterns(..., mean=False)`
    gives) or one pattern [layer, head, query, key]."""
    import pandas as pd

    if patterns.ndim == 4:
        patterns = patterns[None]
    first, n = layout.n_prefix, layout.n_patches
    queries = patterns[..., first:first + n, :]  # patch queries, all keys [B, L, H, q, k]
    to_prefix = queries[..., :first].sum(-1)
    to_self = torch.diagonal(queries[..., first:first + n], dim1=-2, dim2=-1)
    entropy = -(queries * queries.clamp_min(1e-12).log()).sum(-1) / np.log(patterns.shape[-1])
    patch_keys = queries[..., first:first + n]
    patch_keys = patch_keys / patch_keys.sum(-1, keepdim=True).clamp_min(1e-12)
    dist = _patch_distances(layout)
    distance = (patch_keys * dist).sum(-1) / dist.mean().clamp_min(1e-12)
    means = [t.mean((0, -1)) for t in (to_prefix, to_self, entropy, distance)]  # each [L, H]
    rows = []
    for layer in range(patterns.shape[1]):
        for head in range(patterns.shape[2]):
            values = [float(t[layer, head]) for t in means]
            rows.append([layer, head, *values, head_type(*values)])
    return pd.DataFrame(rows, columns=["layer", "head", "to_prefix", "to_self", "entropy", "distance", "type"])


def head_gallery(readout: Tensor, layout, stats=None, max_layers: int = 12, max_heads: int = 12):
    """A grid of heatmaps, one row per layer and one column per head: what the readout query
    attends to on the patch grid. At most `max_layers` (evenly spaced) x `max_heads` panels."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n_layers, n_heads = readout.shape[:2]
    layers = _spaced(n_layers, max_layers)
    heads = list(range(min(n_heads, max_heads)))
    kinds = {}
    if stats is not None:
        kinds = {(int(r.layer), int(r.head)): r.type for r in stats.itertuples()}
    titles = [f"L{i}H{h}" + (f" {kinds[(i, h)]}" if (i, h) in kinds else "") for i in layers for h in heads]
    fig = make_subplots(rows=len(layers), cols=len(heads), subplot_titles=titles,
                        horizontal_spacing=0.01, vertical_spacing=0.03 if len(layers) > 6 else 0.06)
    grid = readout.reshape(n_layers, n_heads, *layout.grid).numpy()
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            fig.add_trace(go.Heatmap(z=grid[layer, head], colorscale="Viridis", showscale=False,
                                     hovertemplate=f"L{layer}H{head}<br>row %{{y}} col %{{x}}<br>"
                                                   "attention %{z:.3f}<extra></extra>"),
                          row=r + 1, col=c + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed", scaleanchor=None)
    fig.update_annotations(font_size=10)
    side = 110 if len(heads) > 6 else 150
    fig.update_layout(height=60 + side * len(layers), width=max(500, 40 + side * len(heads)),
                      title="attention of the readout query over the patches, per head",
                      margin=dict(l=10, r=10, t=60, b=10))
    return fig


def head_type_figure(stats):
    """Heads placed by distance (x) and entropy (y), coloured by type."""
    import plotly.express as px

    frame = stats.assign(name=[f"L{r.layer}H{r.head}" for r in stats.itertuples()])
    fig = px.scatter(frame, x="distance", y="entropy", color="type", hover_name="name",
                     hover_data=["to_prefix", "to_self"], category_orders={"type": list(HEAD_TYPES)},
                     title="head types: attention distance (1 = as far as uniform) against entropy")
    fig.update_traces(marker_size=11)
    return fig


def _spaced(n: int, k: int) -> list[int]:
    """`k` indices of `range(n)`, evenly spaced, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
