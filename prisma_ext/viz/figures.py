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


def lens_figure(result, title: str | None = None, batch: int = 0, cls: int | None = None, **_: int):
    """Logit lens: one class's logit on the patch grid, one panel per layer, each patch labelled
    with its top class at that layer. `cls` indexes the result's class axis (default: the
    model's prediction for image `batch`)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pooled = result.part("pooled").values[batch]  # [layer, class]
    cls = int(pooled[-1].argmax()) if cls is None else cls
    grids = result.select(batch=batch).grid()  # [layer, class, rows, cols]
    layers = result.labels("layer")[:MAX_PANELS]
    names = [str(x) for x in result.labels("class")]
    n_cols = min(6, len(layers))
    n_rows = -(-len(layers) // n_cols)
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=[f"layer {x}" for x in layers])
    values = grids[:, cls].detach().float().cpu().numpy()
    top = grids.argmax(1).cpu().numpy()  # [layer, rows, cols]
    lo, hi = float(values.min()), float(values.max())
    for i, _layer in enumerate(layers):
        text = [[names[j] for j in row] for row in top[i]]
        fig.add_trace(go.Heatmap(z=values[i], text=text, texttemplate="%{text}", zmin=lo, zmax=hi,
                                 colorscale="RdBu_r", showscale=i == 0,
                                 hovertemplate="logit %{z:.3f}<br>top %{text}<extra></extra>"),
                      row=i // n_cols + 1, col=i % n_cols + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    fig.update_layout(title=title or f"logit lens: {names[cls]} (image {batch})")
    return fig


def comparison_figure(result, title: str | None = None):
    """Attribution methods side by side: one bar chart per column (each AUC, seconds)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    columns = result.labels("column")
    methods = [str(m) for m in result.labels("method")]
    better = result.meta.get("better", {})
    titles = [f"{c} ({better[c]} is better)" if c in better else c for c in columns]
    fig = make_subplots(rows=1, cols=len(columns), subplot_titles=titles)
    values = result.values.detach().float().cpu().numpy()
    for j in range(len(columns)):
        fig.add_trace(go.Bar(x=methods, y=values[:, j], showlegend=False), row=1, col=j + 1)
    fig.update_layout(title=title or "attribution methods compared")
    return fig
