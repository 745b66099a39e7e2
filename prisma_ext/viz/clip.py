"""Figures of the CLIP methods of `prisma_ext.analysis`: the image embedding split by head
(`decomposition_scores`), TextSpan, head ablation, zero-shot segmentation, high-norm tokens and
test-time registers. Each takes the AnalysisResult its method returns and refuses any other.

    scores = decomposition_scores(px.clip_decomposition(clip, images), clip, ["a red circle"])
    decomposition_figure(scores, text=0, batch=0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError

ATTN_COLOUR, MLP_COLOUR, OTHER_COLOUR = "#4c78a8", "#f58518", "#9d9d9d"


def _expect(result: Any, figure: str, method: str, how: str) -> None:
    """InputError unless `result` is the AnalysisResult of `method` (`how`: how to get one)."""
    got = getattr(result, "method", None)
    if got != method:
        what = repr(got) if isinstance(got, str) else type(result).__name__
        raise InputError(f"{figure}: expected the result of {how}, got {what}")


def _array(values: Any) -> np.ndarray:
    """A tensor (or array) as a float64 numpy array, so the plotted parts add up as computed."""
    if hasattr(values, "detach"):
        values = values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _index(i: int, n: int, what: str, figure: str) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
        raise InputError(f"{figure}: {what} must be an int in [0, {n}), got {i!r}")
    return int(i) % n


def _lookup(value: int | str, labels: Sequence[str], what: str, figure: str) -> int:
    """The index of `value`: an index, or one of `labels` (texts, head labels)."""
    if isinstance(value, str):
        if value not in labels:
            shown = ", ".join(repr(t) for t in list(labels)[:6]) + (", ..." if len(labels) > 6 else "")
            raise InputError(f"{figure}: the result has no {what} {value!r}; its {what}s are {shown}")
        return list(labels).index(value)
    return _index(value, len(labels), what, figure)


def _layer_names(result: Any, n: int) -> list[str]:
    labels = [str(x) for x in result.labels("layer")] if "layer" in result.dims else list(range(n))
    return [x if x.startswith("L") else f"L{x}" for x in map(str, labels)]


def _patch_axes(fig, cols: Sequence[int], image: bool = False) -> None:
    """Patch-grid panels: no ticks, square cells, row 0 at the top (a go.Image does that itself)."""
    for c in cols:
        fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain", row=1, col=c)
        fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain",
                         scaleanchor=f"x{'' if c == 1 else c}", autorange=None if image else "reversed", row=1, col=c)


# ------------------------------------------------------------------------------- decomposition


def decomposition_figure(result: Any, text: int | str = 0, batch: int | None = None, title: str | None = None):
    """One text's score split over the image embedding's parts (`decomposition_scores`' result).

    Left: a heatmap [layer x head] of each head's part (rows layer 0 at the top, columns heads).
    Right: bars of the other parts: each layer's MLP, each layer's attention bias, the embedding
    (the stream entering block 0) and the constant (the projection's and final norm's biases).
    Heads and bars add up to the score, which the title states with each group's sum.
    `text`: the text's index or string; `batch`: one image, or None for the mean over the batch
    (the mean of each part, which adds up to the mean score). `layout.meta` holds
    {"text", "score", "heads", "mlp", "attn_bias", "embedding", "constant"}.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = "decomposition_figure"
    _expect(result, figure, "decomposition_scores",
            "decomposition_scores(px.clip_decomposition(clip, images), clip, texts)")
    texts = list(result.meta.get("texts") or result.labels("text"))
    t = _lookup(text, texts, "text", figure)
    n_images = result.values.shape[0]
    b = None if batch is None else _index(batch, n_images, "batch", figure)

    def pick(values: Any) -> np.ndarray:  # [batch, ..., text] -> [...] at the text, for the image (or mean)
        v = _array(values)[..., t]
        return v.mean(0) if b is None else v[b]

    heads = pick(result.values)  # [layer, head]
    mlp, bias = pick(result.part("mlp").values), pick(result.part("attn_bias").values)  # [layer]
    embedding, constant = float(pick(result.part("embedding").values)), float(pick(result.part("constant").values))
    score = float(pick(result.meta["score"]))
    layers = _layer_names(result, heads.shape[0])
    head_names = [f"H{h}" for h in range(heads.shape[1])]
    labels = [f"{x} MLP" for x in layers] + [f"{x} attn bias" for x in layers] + ["embedding", "constant"]
    bars = np.concatenate([mlp, bias, [embedding, constant]])
    colours = [MLP_COLOUR] * len(layers) + [ATTN_COLOUR] * len(layers) + [OTHER_COLOUR] * 2
    kind = "cosine" if result.meta.get("scale", "cosine") == "cosine" else "score (embedding . unit text)"
    which = f"image {b}" if b is not None else f"mean over {n_images} images"
    default = (f"{texts[t]!r} ({which}): {kind} {score:.4f} = heads {heads.sum():.4f} (left) + MLPs "
               f"{mlp.sum():.4f} + attention biases {bias.sum():.4f} + embedding {embedding:.4f} + constant "
               f"{constant:.4f} (right)")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.16,
                        subplot_titles=("each head's part (layer x head)", "the other parts"))
    fig.add_trace(go.Heatmap(z=heads, x=head_names, y=layers, colorscale="RdBu_r", zmid=0.0,
                             colorbar=dict(title=kind.split(" ")[0], x=0.41, len=0.9),
                             hovertemplate="%{y}%{x}: %{z:.4f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=labels, y=bars, marker_color=colours, showlegend=False,
                         hovertemplate="%{x}: %{y:.4f}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="head", row=1, col=1)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    fig.update_yaxes(title_text=kind.split(" ")[0], row=1, col=2)
    fig.update_layout(title=title or default, height=max(380, 160 + 40 * len(layers)),
                      meta=dict(text=texts[t], score=score, heads=float(heads.sum()), mlp=float(mlp.sum()),
                                attn_bias=float(bias.sum()), embedding=embedding, constant=constant))
    return fig


# ------------------------------------------------------------------------------- TextSpan


def text_span_figure(result: Any, heads: Sequence[int | str] | None = None, title: str | None = None):
    """TextSpan (`px.text_span`'s result): each head's explained variance against its basis size
    (one line per head; hover names the text picked at that size), and a table of the texts
    chosen per head, in order. `heads`: indices or labels ("L3H1") of the heads to draw
    (default: all). A head explained fully before k picks stops there (no later points)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = "text_span_figure"
    _expect(result, figure, "text_span", "px.text_span(clip, images, texts, heads=...)")
    names = [str(x) for x in result.labels("head")]
    rows = list(range(len(names))) if heads is None else [_lookup(h, names, "head", figure) for h in heads]
    explained = _array(result.values)  # [head, rank]
    ranks = [int(r) for r in result.labels("rank")]
    chosen = result.meta["texts"]
    fig = make_subplots(rows=2, cols=1, row_heights=[0.6, 0.4], vertical_spacing=0.2,
                        specs=[[{"type": "xy"}], [{"type": "table"}]])
    for i in rows:
        texts = list(chosen[i]) + [""] * (len(ranks) - len(chosen[i]))
        fig.add_trace(go.Scatter(x=ranks, y=explained[i], text=texts, mode="lines+markers", name=names[i],
                                 hovertemplate=names[i] + " with %{x} texts: %{y:.3f}<br>text %{x}: %{text}"
                                               "<extra></extra>"), row=1, col=1)
    header = ["head", *[f"text {r}" for r in ranks]]
    columns = [[names[i] for i in rows]] + [[chosen[i][j] if j < len(chosen[i]) else "" for i in rows]
                                           for j in range(len(ranks))]
    fig.add_trace(go.Table(header=dict(values=header, align="left"), cells=dict(values=columns, align="left")),
                  row=2, col=1)
    fig.update_xaxes(title_text="basis size (texts picked)", tickvals=ranks, row=1, col=1)
    fig.update_yaxes(title_text="explained variance", range=[0, 1.05], row=1, col=1)
    n = result.meta.get("n_images")
    default = (f"TextSpan: each head's variance{f' over {n} images' if n else ''} explained by its first texts "
               f"(from {result.meta.get('n_texts', '?')} texts)")
    fig.update_layout(title=title or default, height=420 + 26 * len(rows), legend=dict(title="head"))
    return fig


# ------------------------------------------------------------------------------- head ablation


def head_ablation_figure(result: Any, title: str | None = None):
    """Head ablation (`px.head_ablation`'s result): zero-shot accuracy with each head
    mean-ablated (heatmap, layer x head), and with whole layers ablated: one layer ("layer"),
    that layer and every later one ("from_layer"), layer 0 up to it ("up_to_layer"), against
    the clean accuracy (dashed)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = "head_ablation_figure"
    _expect(result, figure, "head_ablation", "px.head_ablation(clip, images, labels, class_names, templates)")
    acc = _array(result.values)  # [layer, head]
    layers = _layer_names(result, acc.shape[0])
    head_names = [str(h) for h in result.labels("head")]
    clean = float(result.meta["clean_accuracy"])
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.16,
                        subplot_titles=("one head ablated (layer x head)", "whole layers ablated"))
    fig.add_trace(go.Heatmap(z=acc, x=head_names, y=layers, colorscale="Viridis",
                             colorbar=dict(title="accuracy", x=0.41, len=0.9),
                             hovertemplate="%{y}%{x} ablated: accuracy %{z:.3f}<extra></extra>"), row=1, col=1)
    for part, name, dash in (("layer", "that layer's heads and bias", "solid"),
                             ("from_layer", "that layer and every later one", "dash"),
                             ("up_to_layer", "layer 0 up to that layer", "dot")):
        fig.add_trace(go.Scatter(x=layers, y=_array(result.part(part).values), mode="lines+markers", name=name,
                                 line=dict(dash=dash), meta=part,
                                 hovertemplate=name + " (%{x}): accuracy %{y:.3f}<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Scatter(x=layers, y=[clean] * len(layers), mode="lines", name=f"clean ({clean:.3f})",
                             meta="clean", line=dict(color="black", dash="dash", width=1)), row=1, col=2)
    fig.update_xaxes(title_text="head", row=1, col=1)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="layer", row=1, col=2)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.05], row=1, col=2)
    n = result.meta.get("n_images")
    default = (f"zero-shot accuracy with heads mean-ablated (clean {clean:.1%}"
               f"{f', {n} images' if n is not None else ''})")
    fig.update_layout(title=title or default, height=max(400, 160 + 40 * len(layers)),
                      legend=dict(orientation="h", y=-0.2))
    return fig


# ------------------------------------------------------------------------------- segmentation


def _pixels(images: Any, b: int) -> np.ndarray:
    """Image `b` as HxWx3 uint8: from a tensor [batch, 3, H, W] (or [3, H, W]) in [0, 1], or an
    HxWx3 uint8 array (one image)."""
    if hasattr(images, "detach"):
        x = images.detach().float().cpu()
        x = x[b] if x.ndim == 4 else x
        return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    x = np.asarray(images)
    x = x[b] if x.ndim == 4 else x
    return x.astype(np.uint8)


def segmentation_figure(result: Any, masks: Any = None, images: Any = None, batch: int = 0,
                        text: int | str | None = None, title: str | None = None):
    """Zero-shot segmentation (`px.zero_shot_segmentation`'s result) of image `batch`: each
    patch's score on the patch grid (over the image when `images` is given: [batch, 3, H, W] in
    [0, 1], as `zoo.heldout(...).images`), the patches above the image's mean patch score (the
    foreground `segmentation_scores` counts), and the exact mask (`masks` [batch, H, W], bool),
    if given. With a text axis, `text` picks one (index or string; default: the image's
    highest-scoring text)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .overlay import png_base64, upscale

    figure = "segmentation_figure"
    _expect(result, figure, "zero_shot_segmentation", "px.zero_shot_segmentation(clip, images, texts, labels=...)")
    b = _index(batch, result.values.shape[0], "batch", figure)
    texts = list(result.meta.get("texts") or [])
    one = result.select(batch=b)
    if "text" in one.dims:
        t = int(_array(result.meta["score"])[b].argmax()) if text is None else _lookup(text, texts, "text", figure)
        one, what = one.select(text=t), texts[t]
    else:
        labels = result.meta.get("labels")
        what = texts[int(labels[b])] if labels is not None and texts else "its own text"
    grid = _array(one.grid())  # [rows, cols]
    lay = result.layout
    ph, pw = lay.patch_size
    source, k = None, 1
    if images is not None:
        big, k = upscale(_pixels(images, b))
        source = f"data:image/png;base64,{png_base64(big)}"
    panels = ["score per patch" + (" (over the image)" if source else ""), "above the image's mean patch score"]
    mask = None
    if masks is not None:
        mask = _array(masks[b] if np.ndim(masks) == 3 else masks)
        panels.append("exact mask")
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=panels, horizontal_spacing=0.04)
    cell = dict(x0=pw * k / 2, dx=pw * k, y0=ph * k / 2, dy=ph * k)
    if source:
        fig.add_trace(go.Image(source=source, hoverinfo="skip"), row=1, col=1)
    top = float(np.abs(grid).max()) or 1.0
    fig.add_trace(go.Heatmap(z=grid, **cell, colorscale="RdBu_r", zmin=-top, zmax=top, opacity=0.6 if source else 1,
                             colorbar=dict(title="score", len=0.8, x=-0.08 if len(panels) > 1 else None),
                             hovertemplate="row %{y} col %{x}<br>score %{z:.4g}<extra></extra>"), row=1, col=1)
    above = (grid > grid.mean()).astype(float)
    fig.add_trace(go.Heatmap(z=above, **cell, colorscale="Greys", zmin=0, zmax=1, showscale=False,
                             hovertemplate="foreground %{z}<extra></extra>"), row=1, col=2)
    if mask is not None:
        fig.add_trace(go.Heatmap(z=mask, x0=k / 2, dx=k, y0=k / 2, dy=k, colorscale="Greys", zmin=0, zmax=1,
                                 showscale=False, hovertemplate="object %{z}<extra></extra>"), row=1, col=3)
    _patch_axes(fig, [1], image=source is not None)
    _patch_axes(fig, range(2, len(panels) + 1))
    default = f"zero-shot segmentation of image {b} for {what!r}: each patch's direct share of the cosine score"
    fig.update_layout(title=title or default, height=360, width=max(480, 290 * len(panels) + 120),
                      margin=dict(l=80, r=10, t=80, b=10))
    return fig


# ------------------------------------------------------------------------------- high-norm tokens


def high_norm_figure(result: Any, layer: int | None = None, batch: int | None = None, title: str | None = None):
    """High-norm tokens (`px.high_norm_tokens`' result). Left: per layer, the largest and the
    median patch-token norm (of image `batch`, or over every image's patches with None) and,
    for one image, the rule's threshold (factor x that image's median). Right: at `layer`
    (default: the first layer with an outlier, else the last), the patch grid of how many images
    have an outlier at each patch (`part("counts")`), or image `batch`'s outliers (0/1)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = "high_norm_figure"
    _expect(result, figure, "high_norm_tokens", "px.high_norm_tokens(model, images)")
    lay = result.layout
    norms = _array(result.values)[..., lay.patch_slice]  # [batch, layer, patch]
    n_images, n_layers = norms.shape[:2]
    b = None if batch is None else _index(batch, n_images, "batch", figure)
    found = result.meta.get("layer")
    if layer is None:
        layer = found if found is not None else n_layers - 1
    layer = _index(layer, n_layers, "layer", figure)
    layers = _layer_names(result, n_layers)
    factor = float(result.meta.get("factor", 4.0))
    if b is None:
        pooled = norms.transpose(1, 0, 2).reshape(n_layers, -1)  # [layer, batch * patch]
        largest, median = pooled.max(-1), np.median(pooled, -1)
        grid = _array(result.part("counts").grid()[layer])
        bar, which = "images with an outlier", f"over {n_images} images"
    else:
        largest, median = norms[b].max(-1), np.median(norms[b], -1)
        grid = _array(result.part("outliers").select(batch=b, layer=layer).grid())
        bar, which = "outlier", f"image {b}"
    n = int(result.meta.get("n_outliers", 0))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.12,
                        subplot_titles=(f"patch-token norms per layer ({which})",
                                        f"outliers on the patch grid at {layers[layer]}"))
    fig.add_trace(go.Scatter(x=layers, y=largest, mode="lines+markers", name="largest patch norm", meta="max"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=layers, y=median, mode="lines+markers", name="median patch norm", meta="median"),
                  row=1, col=1)
    if b is not None:
        threshold = _array(result.meta["threshold"])[b]
        fig.add_trace(go.Scatter(x=layers, y=threshold, mode="lines", name=f"threshold ({factor:g} x median)",
                                 meta="threshold", line=dict(dash="dash", color="black", width=1)), row=1, col=1)
    fig.add_trace(go.Heatmap(z=grid, colorscale="Reds", zmin=0, zmax=max(1.0, float(grid.max())),
                             colorbar=dict(title=bar, len=0.8),
                             hovertemplate="row %{y} col %{x}: %{z:g}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="residual stream after", row=1, col=1)
    fig.update_yaxes(title_text="norm", rangemode="tozero", row=1, col=1)
    _patch_axes(fig, [2])
    default = (f"high-norm tokens: {n} outlier{'s' if n != 1 else ''} (a patch above {factor:g} x its image's "
               "median patch norm)")
    fig.update_layout(title=title or default, height=400, legend=dict(orientation="h", y=-0.2))
    return fig


def test_time_register_figure(result: Any, layer: int | None = None, batch: int = 0, title: str | None = None):
    """A test-time register (`px.test_time_register`'s result), image `batch`: the readout's
    attention over the patches at `layer` (default: the last), averaged over heads, before and
    after the register is added (one colour scale), and the share of the readout's attention
    that goes to the register, per layer (mean over heads; zero up to the register's layer,
    where its key is masked)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = "test_time_register_figure"
    _expect(result, figure, "test_time_register", "px.test_time_register(model, images, neurons, layer)")
    before_part, after_part = result.part("attention_before"), result.part("attention_after")
    n_images, n_layers = before_part.values.shape[:2]
    b = _index(batch, n_images, "batch", figure)
    shown = _index(n_layers - 1 if layer is None else layer, n_layers, "layer", figure)
    layers = _layer_names(result, n_layers)
    before = _array(before_part.select(batch=b, layer=shown).mean_over("head").grid())  # [rows, cols]
    after = _array(after_part.select(batch=b, layer=shown).mean_over("head").grid())
    share = _array(result.part("register_attention").values[b]).mean(-1)  # [layer]
    top = max(float(before.max()), float(after.max())) or 1.0
    fig = make_subplots(rows=1, cols=3, column_widths=[0.27, 0.27, 0.46], horizontal_spacing=0.08,
                        subplot_titles=(f"before, {layers[shown]}", f"with the register, {layers[shown]}",
                                        "the register's share, per layer"))
    for col, grid in ((1, before), (2, after)):
        fig.add_trace(go.Heatmap(z=grid, zmin=0, zmax=top, colorscale="Viridis", showscale=col == 1,
                                 colorbar=dict(title="attention", len=0.8, x=-0.07),
                                 hovertemplate="row %{y} col %{x}: %{z:.4f}<extra></extra>"), row=1, col=col)
    fig.add_trace(go.Scatter(x=layers, y=share, mode="lines+markers", name="mean over heads", showlegend=False,
                             hovertemplate="%{x}: %{y:.4f}<extra></extra>"), row=1, col=3)
    _patch_axes(fig, [1, 2])
    fig.update_xaxes(title_text="layer", row=1, col=3)
    fig.update_yaxes(title_text="attention to the register", rangemode="tozero", row=1, col=3)
    meta = result.meta
    default = (f"test-time register (neurons {', '.join(map(str, meta.get('neurons', [])))} moved at "
               f"{layers[meta['layer']]}): the readout's attention, image {b}; output changed by at most "
               f"{float(meta.get('max_output_change', float('nan'))):.3g}")
    fig.update_layout(title=title or default, height=380, margin=dict(l=90))
    return fig


test_time_register_figure.__test__ = False  # not a pytest test, despite its name
