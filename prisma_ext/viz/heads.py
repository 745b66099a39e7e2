"""Figures of attention heads: the gallery of what the readout query attends to, per head, and
heads placed by their statistics (the numbers: `prisma_ext.analysis.heads`).

    fig = head_gallery(px.readout_attention(model, images), stats=px.head_statistics(patterns))
"""

from __future__ import annotations

from .._deprecated import moved

HEAD_TYPES = ("sink", "self", "local", "global", "content")

# the previous release computed patterns and statistics here; they moved to prisma_ext.analysis.heads
__getattr__ = moved(__name__, "prisma_ext.analysis.heads", renames={
    "head_patterns": "legacy_head_patterns", "head_stats": "legacy_head_stats",
    "readout_attention": "legacy_readout_attention", "head_type": "head_type"})


def head_gallery(readout, layout=None, stats=None, max_layers: int = 12, max_heads: int = 12,
                 image=None, opacity: float = 0.7):
    """A grid of heatmaps, one row per layer and one column per head: what the readout query
    attends to on the patch grid (`readout`: `px.readout_attention`'s result [layer, head, patch],
    or such a tensor with its `layout`). `stats` (`px.head_statistics`' result, or its
    DataFrame) labels each head with its type. At most `max_layers` (evenly spaced) x
    `max_heads` panels. Every panel shares one colour scale (0 to the largest attention shown),
    so a near-uniform head looks dim, not bright; `image` (HxWx3 uint8 at the model's input
    size) is drawn under each panel, the attention over it with `opacity`."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .figures import square_cells
    from .overlay import png_base64, upscale

    if hasattr(readout, "values") and hasattr(readout, "layout"):
        readout, layout = readout.values, readout.layout
    if stats is not None and hasattr(stats, "to_dataframe") and not hasattr(stats, "itertuples"):
        stats = stats.to_dataframe()
    n_layers, n_heads = readout.shape[:2]
    layers = evenly_spaced(n_layers, max_layers)
    heads = list(range(min(n_heads, max_heads)))
    kinds = {}
    if stats is not None:
        kinds = {(int(r.layer), int(r.head)): r.type for r in stats.itertuples()}
    titles = [f"L{i}H{h}" + (f" {kinds[(i, h)]}" if (i, h) in kinds else "") for i in layers for h in heads]
    fig = make_subplots(rows=len(layers), cols=len(heads), subplot_titles=titles,
                        horizontal_spacing=0.01, vertical_spacing=0.03 if len(layers) > 6 else 0.06)
    grid = readout.reshape(n_layers, n_heads, *layout.grid).float().numpy()
    top = float(grid[layers][:, heads].max()) or 1.0
    ph, pw = layout.patch_size
    source = None
    if image is not None:
        big, k = upscale(image)
        source, ph, pw = f"data:image/png;base64,{png_base64(big)}", ph * k, pw * k
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            if source is not None:
                fig.add_trace(go.Image(source=source, hoverinfo="skip"), row=r + 1, col=c + 1)
            fig.add_trace(go.Heatmap(z=grid[layer, head], x0=pw / 2, dx=pw, y0=ph / 2, dy=ph, zmin=0, zmax=top,
                                     colorscale="Viridis", opacity=opacity if source is not None else 1.0,
                                     showscale=r == 0 and c == 0,
                                     colorbar=dict(title="attention", len=0.5, y=1, yanchor="top"),
                                     hovertemplate=f"L{layer}H{head}<br>row %{{y}} col %{{x}}<br>"
                                                   "attention %{z:.3f}<extra></extra>"),
                          row=r + 1, col=c + 1)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False,
                     autorange="reversed" if source is None else None)
    square_cells(fig)
    fig.update_annotations(font_size=10)
    side = 150 if len(heads) <= 6 else 110 if len(heads) <= 9 else 92  # 12 heads fit a 1300-px page
    fig.update_layout(height=80 + side * len(layers), width=max(500, 120 + side * len(heads)),
                      title="attention of the readout query over the patches, per head (one scale)",
                      margin=dict(l=10, r=10, t=70, b=10))
    return fig


def head_type_figure(stats):
    """Heads placed by distance (x) and entropy (y), coloured by type (`stats`: `px.head_statistics`'
    result, or its DataFrame)."""
    import plotly.express as px

    if hasattr(stats, "to_dataframe") and not hasattr(stats, "itertuples"):
        stats = stats.to_dataframe()
    frame = stats.assign(name=[f"L{r.layer}H{r.head}" for r in stats.itertuples()])
    fig = px.scatter(frame, x="distance", y="entropy", color="type", hover_name="name",
                     hover_data=["to_prefix", "to_self"], category_orders={"type": list(HEAD_TYPES)},
                     title="head types: attention distance (1 = as far as uniform) against entropy")
    fig.update_traces(marker_size=11)
    return fig


def evenly_spaced(n: int, k: int) -> list[int]:
    """`k` indices of `range(n)`, evenly spaced, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
