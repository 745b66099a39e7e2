"""Plotly figures of AnalysisResult objects, on the image's patch grid where there is one."""

from __future__ import annotations

import numpy as np

MAX_PANELS = 24


def _fix_axes(result, keep: set[str], index: dict[str, int]):
    """Select `index` (default 0) on every axis that is not kept."""
    chosen = {d: index.get(d, 0) for d in result.dims if d not in keep}
    return result.select(**chosen) if chosen else result


def _defaulted(result, keep: set[str], index: dict[str, int]) -> str:
    """' (head 0; pick with head=...)' for the axes besides batch that a figure fixes at 0 unasked."""
    fixed = [d for d in result.dims if d not in keep and d not in index and d != "batch"]
    if not fixed:
        return ""
    shown = ", ".join(f"{d} {result.labels(d)[0]}" for d in fixed)
    return f" ({shown}; pick with {', '.join(f'{d}=...' for d in fixed)})"


def result_figure(result, facet: str | None = None, title: str | None = None, **index: int):
    import plotly.express as px
    import plotly.graph_objects as go

    title = title or result.method
    spatial = next((d for d in ("token", "patch") if d in result.dims), None)
    if spatial:
        others = [d for d in result.dims if d != spatial and d not in index]
        if facet is None:
            facet = next((d for d in others if d != "batch"), None)
        keep = {spatial} | ({facet} if facet else set())
        title += _defaulted(result, keep, index)
        sub = _fix_axes(result, keep, index)
        grid = sub.grid().detach().float().cpu().numpy()
        if facet:
            labels = sub.labels(facet)[:MAX_PANELS]
            grid = grid[:MAX_PANELS] if grid.ndim == 3 else grid[None]
            fig = px.imshow(grid, facet_col=0, facet_col_wrap=min(6, len(labels)),
                            color_continuous_scale="RdBu_r", color_continuous_midpoint=0.0, title=title)
            for ann, label in zip(fig.layout.annotations, labels):
                ann.text = f"{facet} {label}"
        else:
            fig = px.imshow(grid, color_continuous_scale="RdBu_r", color_continuous_midpoint=0.0, title=title)
        fig.update_xaxes(showticklabels=False)
        fig.update_yaxes(showticklabels=False)
        return fig
    free = [d for d in result.dims if d not in index and d != "batch"][:2]
    title += _defaulted(result, set(free), index)
    sub = _fix_axes(result, set(free), index)
    values = sub.values.detach().float().cpu().numpy()
    if values.ndim == 1:
        return go.Figure(go.Bar(x=[str(x) for x in sub.labels(free[0])], y=values), layout=dict(title=title))
    if values.ndim == 0:
        return go.Figure(go.Bar(x=[result.method], y=[float(values)]), layout=dict(title=title))
    return px.imshow(np.asarray(values), x=[str(x) for x in sub.labels(free[1])],
                     y=[str(y) for y in sub.labels(free[0])], color_continuous_scale="RdBu_r",
                     color_continuous_midpoint=0.0, title=title, aspect="auto")


def lens_figure(result, facet: str = "layer", title: str | None = None, batch: int = 0, cls: int | None = None,
                layer: int = -1, **_: int):
    """Logit lens: one class's logit on the patch grid, each patch labelled with its top class.
    facet="layer": one panel per layer of image `batch`; facet="batch": one panel per image at
    `layer`. `cls` indexes the result's class axis (default: the model's prediction for image
    `batch`)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if facet not in ("layer", "batch"):
        raise ValueError(f"lens figure: facet must be 'layer' or 'batch', got {facet!r}")
    pooled = result.part("pooled").values[batch]  # [layer, class]
    cls = int(pooled[-1].argmax()) if cls is None else cls
    names = [str(x) for x in result.labels("class")]
    if facet == "layer":
        grids = result.select(batch=batch).grid()  # [layer, class, rows, cols]
        panels = [f"layer {x}" for x in result.labels("layer")][:MAX_PANELS]
        default_title = f"logit lens: {names[cls]} (image {batch})"
    else:
        n_layers = result.values.shape[1]
        grids = result.select(layer=layer % n_layers).grid()  # [batch, class, rows, cols]
        panels = [f"image {i}" for i in range(grids.shape[0])][:MAX_PANELS]
        default_title = f"logit lens: {names[cls]} at layer {result.labels('layer')[layer % n_layers]}"
    grids = grids[:len(panels)]
    n_cols = min(6, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=panels)
    values = grids[:, cls].detach().float().cpu().numpy()
    top = grids.argmax(1).cpu().numpy()  # [panel, rows, cols]
    lo, hi = float(values.min()), float(values.max())
    for i in range(len(panels)):
        text = [[names[j] for j in row] for row in top[i]]
        fig.add_trace(go.Heatmap(z=values[i], text=text, texttemplate="%{text}", zmin=lo, zmax=hi,
                                 colorscale="RdBu_r", showscale=i == 0,
                                 hovertemplate="logit %{z:.3f}<br>top %{text}<extra></extra>"),
                      row=i // n_cols + 1, col=i % n_cols + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    fig.update_layout(title=title or default_title)
    return fig


def comparison_figure(result, facet: str = "column", title: str | None = None):
    """Attribution methods side by side: one bar chart per column (each AUC, seconds), a bar per
    method; or, with facet="method", one chart per method, a bar per column."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if facet not in ("column", "method"):
        raise ValueError(f"comparison figure: facet must be 'column' or 'method', got {facet!r}")
    columns = result.labels("column")
    methods = [str(m) for m in result.labels("method")]
    better = result.meta.get("better", {})
    column_titles = [f"{c} ({better[c]} is better)" if c in better else c for c in columns]
    values = result.values.detach().float().cpu().numpy()
    if facet == "method":
        values, panels, bars = values.T, methods, columns
    else:
        panels, bars = column_titles, methods
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=panels)
    for j in range(len(panels)):
        fig.add_trace(go.Bar(x=[str(b) for b in bars], y=values[:, j], showlegend=False), row=1, col=j + 1)
    fig.update_layout(title=title or "attribution methods compared")
    return fig
