"""Plotly figures of AnalysisResult objects, on the image's patch grid where there is one."""

from __future__ import annotations

import numpy as np

MAX_PANELS = 24


def square_cells(fig) -> None:
    """Every subplot's y axis scaled to its x axis, so a patch grid keeps its aspect ratio."""
    for key in list(fig.layout):
        if key.startswith(("xaxis", "yaxis")):
            fig.layout[key].constrain = "domain"
        if key.startswith("yaxis"):
            fig.layout[key].scaleanchor = "x" + key[len("yaxis"):]


def balanced_columns(n: int, most: int = 6) -> int:
    """Columns for `n` panels in rows of at most `most`, the rows as even as can be (5 -> 5, 7 -> 4)."""
    rows = -(-n // most)
    return -(-n // rows)


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
            fig = px.imshow(grid, facet_col=0, facet_col_wrap=balanced_columns(len(labels)),
                            color_continuous_scale="RdBu_r", color_continuous_midpoint=0.0, title=title)
            for ann, label in zip(fig.layout.annotations, labels):
                ann.text = f"{facet} {label}"
        else:
            fig = px.imshow(grid, color_continuous_scale="RdBu_r", color_continuous_midpoint=0.0, title=title)
        fig.update_xaxes(showticklabels=False)
        fig.update_yaxes(showticklabels=False)
        fig.update_layout(coloraxis_colorbar_title=value_name(result))
        return fig
    free = [d for d in result.dims if d not in index and d != "batch"][:2]
    title += _defaulted(result, set(free), index)
    sub = _fix_axes(result, set(free), index)
    values = sub.values.detach().float().cpu().numpy()
    if values.ndim == 1:
        return go.Figure(go.Bar(x=[str(x) for x in sub.labels(free[0])], y=values),
                         layout=dict(title=title, xaxis_title=free[0], yaxis_title=value_name(result)))
    if values.ndim == 0:
        return go.Figure(go.Bar(x=[result.method], y=[float(values)]),
                         layout=dict(title=title, yaxis_title=value_name(result)))
    fig = px.imshow(np.asarray(values), x=[str(x) for x in sub.labels(free[1])],
                    y=[str(y) for y in sub.labels(free[0])], color_continuous_scale="RdBu_r",
                    color_continuous_midpoint=0.0, title=title, aspect="auto",
                    labels=dict(x=free[1], y=free[0], color=value_name(result)))
    return fig


def value_name(result) -> str:
    """What a result's values are, for a colour bar or an axis: meta["unit"], else "value"."""
    return str(result.meta.get("unit") or "value")


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
    n_cols = balanced_columns(len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=panels, horizontal_spacing=0.03)
    values = grids[:, cls].detach().float().cpu().numpy()
    top = grids.argmax(1).cpu().numpy()  # [panel, rows, cols]
    lo, hi = float(values.min()), float(values.max())
    for i in range(len(panels)):
        text = [[names[j] for j in row] for row in top[i]]
        fig.add_trace(go.Heatmap(z=values[i], text=text, zmin=lo, zmax=hi, colorscale="RdBu_r",
                                 showscale=i == 0, colorbar=dict(title=f"logit of {names[cls]}", len=0.8),
                                 hovertemplate="row %{y} col %{x}<br>logit %{z:.3f}<br>top class %{text}"
                                               "<extra></extra>"),
                      row=i // n_cols + 1, col=i % n_cols + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    square_cells(fig)
    fig.update_layout(title=title or default_title, height=140 + 240 * n_rows)
    return fig


def top_class_figure(result, batch: int = 0, title: str | None = None, max_classes: int = 10):
    """Logit lens: each patch's top class, layer by layer, one colour per class with a legend
    (the `max_classes` most frequent classes by name, the rest as "other")."""
    import plotly.colors
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = [str(x) for x in result.labels("class")]
    top = result.select(batch=batch).grid().argmax(1).cpu().numpy()[:MAX_PANELS]  # [layer, rows, cols]
    panels = [f"layer {x}" for x in result.labels("layer")][:len(top)]
    ids, counts = np.unique(top, return_counts=True)
    shown = [int(i) for i in ids[np.argsort(-counts, kind="stable")][:max_classes]]
    code = np.full(top.shape, len(shown), dtype=float)  # len(shown) = "other"
    for k, cls in enumerate(shown):
        code[top == cls] = k
    palette = plotly.colors.qualitative.Plotly + plotly.colors.qualitative.Set3
    colours = [palette[k % len(palette)] for k in range(len(shown))] + ["#d9d9d9"]
    n = len(colours)
    scale = []
    for k, colour in enumerate(colours):  # a step colour scale: code k -> colour k
        scale += [[k / n, colour], [(k + 1) / n, colour]]
    labels = [names[c] for c in shown] + ["other"]
    n_cols = balanced_columns(len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=panels, horizontal_spacing=0.03)
    for i in range(len(panels)):
        text = [[labels[int(v)] if int(v) < len(shown) else names[int(t)] for v, t in zip(cr, tr)]
                for cr, tr in zip(code[i], top[i])]
        fig.add_trace(go.Heatmap(z=code[i] + 0.5, text=text, zmin=0, zmax=n, colorscale=scale, showscale=False,
                                 hovertemplate="row %{y} col %{x}<br>top class %{text}<extra></extra>"),
                      row=i // n_cols + 1, col=i % n_cols + 1)
    for label, colour in zip(labels[:-1] if len(shown) == len(ids) else labels, colours):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=label,
                                 marker=dict(size=12, symbol="square", color=colour)))
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed")
    square_cells(fig)
    fig.update_layout(title=title or "logit lens: each patch's top class", height=max(140 + 240 * n_rows, 120 + 22 * n),
                      legend=dict(title="top class"), plot_bgcolor="white")
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
        unit = ("seconds" if "second" in str(columns[j]) else "AUC") if facet == "column" else "value"
        fig.update_yaxes(title_text=unit, row=1, col=j + 1)
    fig.update_layout(title=title or "attribution methods compared")
    return fig
