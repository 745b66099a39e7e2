"""Plotly figures of AnalysisResult objects, on the image's patch grid where there is one."""

from __future__ import annotations

import numpy as np

MAX_PANELS = 24


def _fix_axes(result, keep: set[str], index: dict[str, int]):
    """Select `index` (default 0) on every axis that is not kept."""
    chosen = {d: index.get(d, 0) for d in result.dims if d not in keep}
    return result.select(**chosen) if chosen else result


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
    sub = _fix_axes(result, set(free), index)
    values = sub.values.detach().float().cpu().numpy()
    if values.ndim == 1:
        return go.Figure(go.Bar(x=[str(x) for x in sub.labels(free[0])], y=values), layout=dict(title=title))
    if values.ndim == 0:
        return go.Figure(go.Bar(x=[result.method], y=[float(values)]), layout=dict(title=title))
    return px.imshow(np.asarray(values), x=[str(x) for x in sub.labels(free[1])],
                     y=[str(y) for y in sub.labels(free[0])], color_continuous_scale="RdBu_r",
                     color_continuous_midpoint=0.0, title=title, aspect="auto")
