"""The report's descriptive sections (prediction, logit lens, logit attribution, CLS attribution,
attention heads) and the `Context` every section reads; `clip_section.py` has a CLIP's embedding
split by head, `experiments.py` the interventions (activation patching) and the comparison with
Captum."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..viz.heads import evenly_spaced
from ..viz.overlay import grid_with_lines, overlay_figure
from .inputs import ImageInput
from .page import Page


@dataclass
class Context:
    """Everything the sections share: the model, both inputs, the target and the clean prediction."""

    model: Any
    source: str
    clean: ImageInput
    corrupted: ImageInput
    x: Tensor  # clean input [1, 3, H, W]
    x_corrupted: Tensor
    logits: Tensor  # clean logits [n_classes]
    probs: Tensor  # clean class probabilities [n_classes]
    target: int
    foil: int  # the class the patching metric compares the target with
    target_given: bool
    top_k: int = 5
    is_clip: bool = False
    settings: Any = None  # report.settings.Settings: how much each section runs
    progress: bool = True  # progress bars on stderr (build_report turns them off when quiet)
    random_weights: bool = False  # a named source loaded with random weights (pretrained=False)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self):
        from ..analysis.backend import Backend

        return Backend.of(self.model).cfg

    @property
    def layout(self):
        from ..analysis.backend import Backend

        return Backend.of(self.model).layout

    @property
    def names(self) -> list[str]:
        n = self.logits.shape[-1]
        names = list(self.model.class_names or [])
        return names if len(names) == n else [f"class {i}" for i in range(n)]

    def name(self, i: int) -> str:
        return self.names[i]


def patch_grid(values: Tensor, layout) -> np.ndarray:
    """Per-patch values [n_patches] as the patch grid [rows, cols]."""
    return values.detach().float().cpu().reshape(layout.grid).numpy()


def progress_bars(ctx: Context) -> bool:
    """tqdm bars (rate, ETA) inside the long steps: on a terminal, unless the report is quiet."""
    return ctx.progress and sys.stderr.isatty()


# ------------------------------------------------------------------------------- prediction


def prediction(ctx: Context, page: Page) -> None:
    """The input with its patch grid and the top-k table."""
    k = min(ctx.top_k, ctx.probs.shape[0])
    top = torch.topk(ctx.probs, k).indices.tolist()
    if ctx.target not in top:
        top.append(ctx.target)
    rows = [[rank + 1 if i in top[:k] else "-", ctx.name(i), i, f"{float(ctx.probs[i]):.2%}",
             float(ctx.logits[i])] for rank, i in enumerate(top)]
    head = "zero-shot " if ctx.is_clip else ""
    page.images([(grid_with_lines(ctx.clean.pixels, ctx.layout.patch_size),
                  f"{ctx.clean.name}: the model's input ({ctx.layout.grid[0]}x{ctx.layout.grid[1]} patches)")])
    page.table(rows, ["rank", "class", "index", "probability", f"{head}logit"], best=top.index(ctx.target))
    how = "given with --target" if ctx.target_given else "the model's top class"
    warning = out_of_distribution(ctx)
    if warning:
        page.note(warning, css="skipped")
    if ctx.random_weights:
        page.note("Random weights (--random-weights): this model was never trained, so its answer and every "
                  "explanation below show the methods at work on noise, not what a trained model does.", css="skipped")
    page.note(f"Every section below explains the target class {ctx.name(ctx.target)!r} ({how}).")


def out_of_distribution(ctx: Context) -> str:
    """A warning when the image is plainly not what the model was trained on: a built-in model
    (trained on `prisma_ext.data` scenes) shown anything but a scene. "" otherwise (for other
    models the report cannot know their training data)."""
    if not ctx.source.startswith("builtin:") or ctx.clean.scene is not None:
        return ""
    top = int(ctx.probs.argmax())
    return (f"Out of distribution: {ctx.source} was trained only on procedural scenes (one shape or digit on a "
            f"plain canvas, prisma_ext.data.make_scenes); {ctx.clean.name} is not one. Its answer "
            f"({ctx.name(top)!r}, {float(ctx.probs[top]):.0%}) and every explanation below describe the model "
            "outside its training data, not what the image shows. Use a scene (--image builtin:red-circle) or a "
            "model trained on photos.")


# ------------------------------------------------------------------------------- logit lens


def logit_lens(ctx: Context, page: Page) -> None:
    """Patch logit lens: per-layer maps of the target's logit, the pooled readout by layer."""
    import plotly.graph_objects as go

    from ..analysis.lens import logit_lens as run_lens
    from ..viz.figures import top_class_figure

    lens = run_lens(ctx.model, ctx.x)
    page.figure(lens.plot(cls=ctx.target, title=f"logit lens: the logit of {ctx.name(ctx.target)!r} read from "
                                                 "every patch, layer by layer (hover: the patch's top class)"))
    page.figure(top_class_figure(lens, title="logit lens: each patch's top class, layer by layer"))
    summary = lens.summary(target=ctx.target)
    pooled = lens.part("pooled").values[0].float().softmax(-1)[:, ctx.target].cpu().numpy()
    layers = [str(x) for x in lens.labels("layer")]
    curve = go.Figure()
    curve.add_trace(go.Scatter(x=layers, y=pooled, mode="lines+markers", name="P(target) of the pooled readout"))
    curve.add_trace(go.Scatter(x=layers, y=summary["patch_top1"], mode="lines+markers", yaxis="y2",
                               name="fraction of patches whose top class is the target", line=dict(dash="dot")))
    curve.update_layout(title=f"{ctx.name(ctx.target)!r} layer by layer", xaxis_title="residual stream after",
                        yaxis=dict(title="probability of the target", range=[0, 1.05 * max(float(pooled.max()), 1e-3)]),
                        yaxis2=dict(title="fraction of patches", range=[0, 1.05], overlaying="y", side="right",
                                    showgrid=False),
                        legend=dict(orientation="h", y=-0.25), height=420)
    page.figure(curve)
    page.note("Each layer's residual stream is read through the final norm and the head: the pooled "
              "readout as the model itself pools it, and each patch as if it were the pooled token.")
    page.dataframe(summary.assign(probability=pooled)[["layer", "probability", "mean_rank", "patch_top1"]])


# ------------------------------------------------------------------------------- logit attribution


def _dla(ctx: Context):
    if "dla" not in ctx.results:
        from ..analysis.attribution import direct_logit_attribution

        ctx.results["dla"] = direct_logit_attribution(ctx.model, ctx.x, target=ctx.target,
                                                      by=("layer", "head", "source"))
    return ctx.results["dla"]


def _layer_key(label: str) -> str:
    """'L3H2' and 'L3.attn_bias' -> 'L3.attn'; other components keep their label."""
    head = label.split(".")[0]
    if label.startswith("L") and ("H" in head or label.endswith(".attn_bias")):
        return head.split("H")[0] + ".attn"
    return label


def _by_layer(labels: list[str], values: np.ndarray) -> tuple[list[str], list[float]]:
    """Components by layer: a layer's heads and attention output bias summed into L{i}.attn."""
    out: dict[str, float] = {}
    for label, v in zip(labels, values):
        out[_layer_key(label)] = out.get(_layer_key(label), 0.0) + float(v)
    return list(out), list(out.values())


def logit_attribution(ctx: Context, page: Page) -> None:
    """Direct logit attribution of the target by layer (attention, MLP) and by head."""
    import plotly.graph_objects as go

    dla = _dla(ctx)
    labels, values = _by_layer(dla.labels("component"), dla.values[0].float().cpu().numpy())
    colours = ["#4c78a8" if ".attn" in x else "#f58518" if ".mlp" in x else "#9d9d9d" for x in labels]
    bars = go.Figure(go.Bar(x=labels, y=values, marker_color=colours))
    bars.update_layout(title=f"direct logit attribution of {ctx.name(ctx.target)!r} by layer "
                             "(blue: attention, orange: MLP)", height=400, yaxis_title="logit")
    page.figure(bars)
    heads = dla.part("head").plot(title=f"direct logit attribution of {ctx.name(ctx.target)!r} by head")
    heads.update_layout(coloraxis_colorbar_title="logit")
    heads.update_layout(height=max(300, 60 + 40 * ctx.cfg.n_layers))
    page.figure(heads)
    score = float(dla.meta["score"][0])
    page.note(f"What each component writes directly into the target's logit ({score:.3f}), the final "
              f"norm's scale frozen ({dla.meta['frozen']}); the parts sum to the logit: "
              f"{float(dla.values[0].sum()):.3f}.")


# ------------------------------------------------------------------------------- CLS attribution


def cls_attribution(ctx: Context, page: Page) -> None:
    """Each head's attribution split over source tokens, summed: a map over the patches."""
    source = _dla(ctx).part("source").values[0].float().cpu()  # [layer, head, token]
    lay = ctx.layout
    patches = source[..., lay.n_prefix:lay.n_prefix + lay.n_patches]
    maps = {"all layers and heads": patch_grid(patches.sum((0, 1)), lay)}
    for i in evenly_spaced(source.shape[0], 17):  # every layer of a ViT-B or ViT-L/24's evenly spaced 17
        maps[f"layer {i}"] = patch_grid(patches[i].sum(0), lay)
    page.figure(overlay_figure(ctx.clean.pixels, maps, lay.patch_size,
                               f"CLS attribution of {ctx.name(ctx.target)!r}: what the heads moved from each "
                               "patch into the readout (red: towards the target)"))
    prefix = float(source[..., :lay.n_prefix].sum())
    total = float(source.sum())
    page.note(f"Direct logit attribution of every head split over the tokens it reads (pattern x value): "
              f"patches {total - prefix:.3f}, prefix tokens {prefix:.3f}, of {total:.3f} from all heads.")


# ------------------------------------------------------------------------------- attention heads


def attention_heads(ctx: Context, page: Page) -> None:
    """The readout query's attention per head, head statistics and rough types."""
    from ..analysis.heads import head_patterns, head_statistics, readout_attention
    from ..viz.heads import head_gallery, head_type_figure
    from .attention_view import CSS as VIEW_CSS
    from .attention_view import attention_view

    patterns = head_patterns(ctx.model, ctx.x, mean=False)
    readout = readout_attention(ctx.model, ctx.x, patterns=patterns.mean_over("batch"))
    stats = head_statistics(patterns).to_dataframe()
    every = ctx.settings.thorough  # a large model's gallery: 6 evenly spaced layers; the view below has all
    page.figure(head_gallery(readout, stats=stats, image=ctx.clean.pixels, max_layers=12 if every else 6))
    page.note("Explore: pick a layer and a head (or their mean), then click a patch, or a prefix token or "
              "the readout, to see where that query attends over the image.")
    page.raw(f"<style>{VIEW_CSS}</style>" + attention_view(patterns.values[0].numpy(), readout.values.float().numpy(),
                                                         ctx.clean.pixels, ctx.layout))
    page.figure(head_type_figure(stats))
    counts = stats["type"].value_counts()
    page.note("Head types (rules of thumb, see prisma_ext.analysis.heads): "
              + ", ".join(f"{n} {t}" for t, n in counts.items()) + ".")
    page.dataframe(stats, digits=3, collapse=f"the statistics of all {len(stats)} heads" if len(stats) > 24 else None)
