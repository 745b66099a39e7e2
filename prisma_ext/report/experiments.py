"""The report's interventions: activation patching against the corrupted image (with the
minimal patch that flips the prediction), and our attribution maps against Captum's."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..viz.overlay import grid_with_lines, overlay_figure
from .page import Page
from .sections import Context, patch_grid, progress_bars

# Attribution methods compared in the Captum section (faster subset of compare_attributions'
# defaults: occlusion with one window per patch equals feature ablation here, and SmoothGrad
# over IG costs 8 x IG).
OUR_METHODS = ("gradient_attention", "attention_rollout", "cls_attribution")
CAPTUM_METHODS = ("integrated_gradients", "saliency", "gradient_shap", "feature_ablation", "layer_gradcam")
BASELINES = ("random",)
# What deletion/insertion put in place of a patch: the image's mean colour. (The analysis
# default, zeros of the normalised input, is a grey patch: on the built-in scenes' black canvas,
# deleting a square object leaves a grey square that still reads as one.)
FAITHFULNESS_BASELINE = "mean"


# ------------------------------------------------------------------------------- activation patching


def _metric_span(ctx: Context) -> tuple[Any, bool]:
    """The patching target, logit(target) - logit(foil), and whether it differs between the runs."""
    from ..analysis.backend import Backend
    from ..analysis.targets import LogitDiff

    backend = Backend.of(ctx.model)
    diffs = []
    for x in (ctx.x, ctx.x_corrupted):
        out = backend.output(x)[0]
        diffs.append(float(out[ctx.target] - out[ctx.foil]))
    return LogitDiff(ctx.target, ctx.foil), abs(diffs[0] - diffs[1]) > 1e-6


def _positions(ctx: Context) -> tuple[Any, str]:
    """What the per-token sweep patches: every token, or each prefix token and K x K patch blocks
    (a dict label -> token indices, prefix first); and the words for it."""
    spec = ctx.settings.positions
    if spec == "all":
        return "all", "that one token's"
    from ..analysis.patching import resolve_positions

    lay = ctx.layout
    blocks = resolve_positions(spec, lay)
    groups = {name: [i] for i, name in enumerate(lay.prefix_names)}
    groups.update(zip(blocks.labels, blocks.groups))
    k = spec.partition(":")[2]
    return groups, f"that {k} x {k} block of patches' (or that prefix token's)"


def per_patch(ctx: Context, result) -> Tensor:
    """The sweep's effect on every patch [layer, n_patches] (a block's value on each of its patches)."""
    lay = ctx.layout
    values = result.values[0]  # [layer, position]
    if ctx.settings.positions == "all":
        return values[:, lay.n_prefix:]
    groups, _ = _positions(ctx)
    out = torch.zeros(values.shape[0], lay.n_patches, dtype=values.dtype)
    for j, tokens in enumerate(groups.values()):
        patches = [t - lay.n_prefix for t in tokens if t >= lay.n_prefix]
        out[:, patches] = values[:, j, None]
    return out


def _per_layer_maps(ctx: Context, result, title: str):
    """The sweep's effect on the patch grid, one square panel per patched layer."""
    import plotly.express as px

    from ..viz.figures import balanced_columns

    grids = per_patch(ctx, result).reshape(-1, *ctx.layout.grid).float().numpy()
    layers = result.labels("layer")
    n_cols = balanced_columns(len(layers))
    fig = px.imshow(grids, facet_col=0, facet_col_wrap=n_cols, color_continuous_scale="RdBu_r",
                    color_continuous_midpoint=0.0, title=title, aspect="equal")
    for ann, layer in zip(fig.layout.annotations, layers):
        ann.text = f"layer {layer}"
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(coloraxis_colorbar=dict(title="metric"), height=260 * -(-len(layers) // n_cols) + 80)
    return fig


def patching(ctx: Context, page: Page) -> None:
    """Activation patching clean -> corrupted: per token (or block) and layer, per layer output,
    per head (thorough); the minimal patch."""
    from ..analysis.patching import activation_patching

    st = ctx.settings
    metric, normalize = _metric_span(ctx)
    page.images([(grid_with_lines(ctx.clean.pixels, ctx.layout.patch_size), f"clean: {ctx.clean.name}"),
                 (grid_with_lines(ctx.corrupted.pixels, ctx.layout.patch_size),
                  f"corrupted: {ctx.corrupted.name}")])
    bars = progress_bars(ctx)
    positions, what = _positions(ctx)
    per_token = activation_patching(ctx.model, ctx.x, ctx.x_corrupted, metric, sites=("resid_pre",),
                                    positions=positions, layers=list(st.layers) if st.layers else None,
                                    normalize=normalize, progress=bars)
    result = per_token["resid_pre"]
    m_clean, m_corr = float(result.meta["clean_metric"][0]), float(result.meta["corrupted_metric"][0])
    scale = "0 = corrupted run, 1 = clean run" if normalize else "raw logit difference (clean = corrupted)"
    page.note(f"Metric: logit({ctx.name(ctx.target)!r}) - logit({ctx.name(ctx.foil)!r}); clean {m_clean:.3f}, "
              f"corrupted {m_corr:.3f}. Each cell: the metric when {what} residual stream "
              f"(entering the layer) is copied from the clean run into the corrupted run ({scale}).")
    page.figure(_per_layer_maps(ctx, result, "activation patching: residual stream per patch, entering each layer"))
    whole = {"all tokens": list(range(ctx.layout.n_tokens))}
    sites = ("attn_out", "mlp_out", "z") if st.heads else ("attn_out", "mlp_out")
    components = activation_patching(ctx.model, ctx.x, ctx.x_corrupted, metric, sites=sites,
                                     positions=whole, layers=list(st.layers) if st.layers else None,
                                     normalize=normalize, progress=bars)
    page.figure(_component_heatmap(ctx, result, components))
    if st.heads:
        page.figure(components["z"].plot(position=0, title="activation patching: each head's output (z) at "
                                                           "every token, per layer (rows) and head (columns)"))
    else:
        page.note("Per-head patching (each head's z at every token) runs with --thorough; direct logit "
                  "attribution above gives each head's direct effect.")
    _minimal_patch(ctx, page, result)


def _component_heatmap(ctx: Context, resid, components):
    import plotly.graph_objects as go

    n = ctx.cfg.n_layers
    patched = [int(x) for x in resid.labels("layer")]
    rows, labels = [], []
    for i, name in enumerate(ctx.layout.prefix_names):
        row = np.full(n, np.nan)
        row[patched] = resid.values[0, :, i].float().numpy()
        rows.append(row)
        labels.append(f"resid_pre ({name})")
    for site in ("attn_out", "mlp_out"):
        row = np.full(n, np.nan)
        row[[int(x) for x in components[site].labels("layer")]] = components[site].values[0, :, 0].float().numpy()
        rows.append(row)
        labels.append(f"{site} (all tokens)")
    layers = [f"L{i}" for i in range(n)]
    fig = go.Figure(go.Heatmap(z=np.stack(rows), x=layers, y=labels, colorscale="RdBu_r", zmid=0,
                               colorbar=dict(title="metric"), hovertemplate="%{y} %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title="activation patching: prefix tokens and whole layer outputs",
                      height=160 + 40 * len(rows), yaxis=dict(autorange="reversed", title="what is patched"),
                      xaxis_title="layer")
    return fig


def patch_order(effect: Tensor, clean: np.ndarray, corrupted: np.ndarray, patch: tuple[int, int]) -> list[int]:
    """Patches in the order to paste them: those whose pixels differ between the two images
    first (the others cannot change a layer-0 patch), each group by the size of its single-patch
    patching effect, largest first."""
    ph, pw = patch
    rows, cols = clean.shape[0] // ph, clean.shape[1] // pw
    diff = np.abs(clean.astype(np.int16) - corrupted.astype(np.int16))[:rows * ph, :cols * pw]
    differs = diff.reshape(rows, ph, cols, pw, -1).max(axis=(1, 3, 4)).flatten() > 0
    size = effect.detach().abs().float().cpu().numpy()
    return sorted(range(len(size)), key=lambda i: (not differs[i], -size[i], i))


def _minimal_patch(ctx: Context, page: Page, resid) -> None:
    """The fewest patches whose clean embedding (layer 0) flips the corrupted run to the target:
    patches pasted in `patch_order`, every count tried in one batched sweep."""
    from ..analysis.patching import activation_patching
    from ..viz.overlay import paste_patches

    lay = ctx.layout
    order = patch_order(per_patch(ctx, resid)[0], ctx.clean.pixels, ctx.corrupted.pixels, lay.patch_size)
    n = lay.n_patches
    few = ctx.settings.minimal_counts
    exact = n <= 100 and few is None
    fractions = (1 / n, 2 / n, 3 / n, .02, .04, .06, .08, .1, .15, .2, .3, .4, .5, .75, 1.0) if few is None else (
        .02, .05, .1, .2, .4, 1.0)[-few:]
    sizes = list(range(1, n + 1)) if exact else sorted({max(1, round(n * f)) for f in fractions})
    groups = {str(k): [lay.n_prefix + p for p in order[:k]] for k in sizes}

    def predicts_target(output: Tensor) -> Tensor:
        return (output.argmax(-1) == ctx.target).float()

    hits = activation_patching(ctx.model, ctx.x, ctx.x_corrupted, predicts_target, sites=("resid_pre",),
                               positions=groups, layers=[0], progress=False)["resid_pre"].values[0, 0]
    flipped = [k for k, hit in zip(sizes, hits.tolist()) if hit > 0.5]
    if not flipped:
        page.note("Minimal patch: no set of clean patch embeddings flips the corrupted prediction to the target.")
        return
    k = flipped[0]
    pasted = paste_patches(ctx.clean.pixels, ctx.corrupted.pixels, order[:k], lay.patch_size)
    page.images([(grid_with_lines(ctx.corrupted.pixels, lay.patch_size), f"corrupted: {ctx.corrupted.name}"),
                 (pasted, f"with {k} clean patches (outlined)"),
                 (grid_with_lines(ctx.clean.pixels, lay.patch_size), f"clean: {ctx.clean.name}")])
    tried = "fewer of them do not" if exact else f"counts tried: {', '.join(map(str, sizes))}"
    page.note(f"Minimal patch: pasting {k} of {n} patches of the clean image into the corrupted one (at the "
              f"embedding: the patch tokens entering layer 0) makes the model predict {ctx.name(ctx.target)!r}; "
              f"{tried}. Patches are pasted in order: those that differ first, each by the size of its own "
              "patching effect at layer 0.")


# ------------------------------------------------------------------------------- Captum


def _methods(ctx: Context) -> list:
    """Ours, Captum's (with the settings' step and sample counts) and the random baseline."""
    from ..analysis.backend import Backend
    from ..analysis.captum_attr import patch_feature_mask

    st = ctx.settings
    ours = [m for m in OUR_METHODS if m != "cls_attribution" or Backend.of(ctx.model).readout.is_linear]
    options = {"integrated_gradients": {"n_steps": st.ig_steps}, "gradient_shap": {"n_samples": st.shap_samples}}
    if st.ablation_block > 1:
        options["feature_ablation"] = {"feature_mask": patch_feature_mask(
            ctx.layout, ctx.x.shape[1], ctx.x.device, block=st.ablation_block)}
    captum = [(m, options[m]) if m in options else m for m in CAPTUM_METHODS]
    return [*ours, *captum, *BASELINES]


def _mask_scores(ctx: Context, flat: Tensor) -> tuple[float, float] | None:
    """(pointing hit, share of positive attribution on the object) when the object mask is known."""
    if ctx.clean.mask is None:
        return None
    lay = ctx.layout
    mask = torch.from_numpy(ctx.clean.mask).float()[None, None]
    covered = torch.nn.functional.avg_pool2d(mask, lay.patch_size).flatten() > 0
    positive = flat.clamp_min(0)
    share = float(positive[covered].sum() / positive.sum().clamp_min(1e-12))
    return float(covered[int(flat.argmax())]), share


def captum(ctx: Context, page: Page) -> None:
    """compare_attributions over ours, Captum's and a random map: table, maps, bars."""
    from ..analysis.compare import compare_attributions

    methods = _methods(ctx)
    result = compare_attributions(ctx.model, ctx.x, target=ctx.target, methods=methods, baseline=FAITHFULNESS_BASELINE,
                                  n_steps=ctx.settings.curve_steps, progress=progress_bars(ctx),
                                  batch_size=8 if ctx.x.device.type == "cpu" else 128)  # CPU: cache-sized chunks
    frame = result.to_dataframe()
    header = ["method", "from", "deletion AUC (lower is better)", "insertion AUC (higher is better)", "seconds"]
    masked = ctx.clean.mask is not None
    if masked:
        header += ["pointing (top patch on the object)", "share on the object"]
    rows, maps = [], {}
    for r in frame.itertuples(index=False):
        family = "prisma-ext" if r.method in OUR_METHODS else "baseline" if r.method in BASELINES else "Captum"
        row = [r.method, family, float(r.deletion), float(r.insertion), float(r.seconds)]
        if r.method in result.parts:
            flat = result.part(r.method).values[0].float().cpu()
            maps[r.method] = patch_grid(flat, ctx.layout)
            scores = _mask_scores(ctx, flat)
            if scores is not None:
                row += [scores[0], scores[1]]
        elif masked:
            row += ["", ""]
        rows.append(row)
    best = int(np.argmax(frame["insertion"].to_numpy() - frame["deletion"].to_numpy()))
    page.table(rows, header, best=best)
    page.note(f"Deletion: the target's probability as the most important patches are replaced by the "
              f"image's mean colour (area under the curve over the fraction removed); insertion: as they are "
              f"revealed on that colour. Bold: the best insertion minus deletion ({frame['method'][best]}). "
              "One image's AUCs are noisy: compare methods over many images before trusting an order. "
              "Seconds: the time to compute the map on this machine." + _ig_delta(ctx, result)
              + _below_random(frame))
    page.figure(overlay_figure(ctx.clean.pixels, maps, ctx.layout.patch_size,
                               f"attribution maps of {ctx.name(ctx.target)!r}, ours and Captum's"))
    page.figure(result.plot(title="deletion and insertion AUC, seconds"))


# Methods known to do poorly on ViTs, and why (said in the report whenever they are compared).
KNOWN_WEAK = {
    "layer_gradcam": "Grad-CAM weights each channel by its gradient averaged over patches, a CNN's "
                     "assumption; on ViTs it is known to be weak (Chefer, Gur & Wolf 2021 measure it near "
                     "random), even on the normalised stream with its ReLU, as run here",
}


def _below_random(frame) -> str:
    """A sentence naming the methods whose insertion minus deletion is below the random map's,
    and what is known about weak methods in the table."""
    score = dict(zip(frame["method"], frame["insertion"] - frame["deletion"]))
    floor = score.get("random")
    text = ""
    if floor is not None:
        worse = [m for m, v in score.items() if m != "random" and v < floor]
        if worse:
            text += (f" Below the random map on this image (insertion minus deletion): {', '.join(worse)}; "
                     "its order of patches explains the prediction no better than chance.")
    known = [f"{m}: {why}." for m, why in KNOWN_WEAK.items() if m in score]
    return text + (" " + " ".join(known) if known else "")


def _ig_delta(ctx: Context, result) -> str:
    """Integrated gradients' convergence delta (attributions' sum minus the score difference)."""
    if "integrated_gradients" not in result.parts or "delta" not in result.part("integrated_gradients").meta:
        return ""
    delta = float(result.part("integrated_gradients").meta["delta"].abs().max())
    return (f" Integrated gradients ({ctx.settings.ig_steps} steps): convergence delta {delta:.3g} (the "
            "attributions' sum minus the change in the target's score from the zero baseline; near 0 is "
            "converged; --thorough uses 50 steps).")
