# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Tutorial 4: Patching: exact, attributed and across modalities
#
# Tutorial 1 ended with one activation-patching sweep: the residual stream, token by token,
# copied from a circle scene into a square scene. This tutorial goes further, on the same
# built-in models:
#
# 1. **Every site at once**: `resid_pre`, `attn_out`, `mlp_out` and each head's `z`, token by
#    token, and the table that finds the cells that matter.
# 2. **Groups of positions**: rows of patches, and the object's patches as one group.
# 3. **Both directions**: denoising asks whether a component is *sufficient* to bring the clean
#    answer back, noising whether it is *necessary* for it.
# 4. **The nnsight backend**: the same sweep on the original timm module, the same numbers.
# 5. **Targets**: `px.LogitDiff` by name or index, or a plain function: the same sweep.
# 6. **Attribution patching**: the gradient estimate of a whole sweep, held against the exact one.
# 7. **CLIP**: the vision tower scored by how much more an image matches one prompt than
#    another, and the text tower patched between two prompts.
#
# Every number in the output is computed when the script runs; the text says how to read them.
# Read it with its outputs in `04_patching.ipynb` (the notebook of this script, figures
# included), run it as a script (the figures, the cells' last expressions, show only in a
# notebook), or open the script as a notebook with Jupytext. docs/patching.md has the API in full.

# %%
import time

import pandas as pd
import plotly.express as pxp
import torch

import prisma_ext as px
from prisma_ext import zoo
from prisma_ext.data.scenes import make_scenes

model = px.load("builtin:shapes-vit")
names = list(model.class_names)
layout = model.layout
size = model.cfg.img_size[0]
A, B = "circle", "square"
a, b = names.index(A), names.index(B)
SITES = ("resid_pre", "attn_out", "mlp_out", "z")


def pair(seed: int, name: str = "shapes-vit"):
    """The circle scene and the square scene drawn from one seed (same place, size and colour) as
    model `name`'s input, and the pixels either object covers."""
    scenes = [make_scenes(1, seed=seed, size=size, classes=[obj], colours=["red"]) for obj in (A, B)]
    x_a, x_b = (zoo.normalize(s.images, name) for s in scenes)
    return x_a, x_b, scenes[0].masks[0] | scenes[1].masks[0]


# the first six seeds whose pair the classifier gets right: one pair for sections 1-3, all six later
pairs = []
for seed in range(50):
    x_a, x_b, covered = pair(seed)
    with torch.no_grad():
        if model(x_a).argmax() == a and model(x_b).argmax() == b:
            pairs.append((seed, x_a, x_b, covered))
    if len(pairs) == 6:
        break
seed, clean, corrupted, covered = pairs[0]

metric = px.LogitDiff(a, b)  # the target every run is scored by: logit(circle) - logit(square)
with torch.no_grad():
    logits = model(torch.cat([clean, corrupted]))
    scores = logits[:, a] - logits[:, b]
print(f"seed {seed}: logit({A}) - logit({B}) is {float(scores[0]):.2f} on the {A} (clean) "
      f"and {float(scores[1]):.2f} on the {B} (corrupted)")
print("seeds of the six pairs:", [p[0] for p in pairs])

# %% [markdown]
# ## 1. Every site, every token
#
# One call patches every (site, layer, token), and every head for `z`. With `normalize=True`, 0
# is the corrupted (square) run's metric and 1 the clean (circle) run's, so a cell reads as "the
# share of the circle this one activation brings back". `to_dataframe()` flattens all sites
# into one long table: sort it to find the cells that matter.

# %%
sweep = px.activation_patching(model, clean, corrupted, metric, sites=SITES, positions="all",
                               normalize=True, progress=False)
for site, result in sweep.items():
    print(f"{site:>9}: {dict(zip(result.dims, result.shape))}")

table = sweep.to_dataframe()
table["head"] = table["head"].astype("Int64")  # only z has heads
top = table.reindex(table["value"].abs().sort_values(ascending=False).index).head(10)
print(top[["site", "layer", "head", "token", "value"]].round(3).to_string(index=False))

# %% [markdown]
# The figures put each patch on the image's grid, one panel per layer. The CLS token has no
# place on the grid, so here it is per layer, next to the best single patch of the residual
# stream:

# %%
per_layer = pd.DataFrame({
    "resid_pre CLS": sweep["resid_pre"].values[0, :, 0],
    "best patch": [sweep["resid_pre"].labels("token")[layout.n_prefix + int(i)]
                   for i in sweep["resid_pre"].values[0, :, layout.n_prefix:].argmax(-1)],
    "its value": sweep["resid_pre"].values[0, :, layout.n_prefix:].amax(-1),
    "attn_out CLS": sweep["attn_out"].values[0, :, 0],
    "mlp_out CLS": sweep["mlp_out"].values[0, :, 0],
}, index=pd.Index(sweep["resid_pre"].labels("layer"), name="layer"))
print(per_layer.round(3).to_string())

# %%
sweep["resid_pre"].plot(title="resid_pre: one token's residual stream pasted into the square run")

# %% [markdown]
# Each head's output `z` has a head axis too. Patched at the CLS token, a layer-by-head map
# shows which heads carry the answer into the token the classifier reads; `select` fixes an axis
# and `plot` draws what is left. (`plot()` of the full `z` result draws head 0 of every layer, as
# its title says: unnamed axes default to index 0; `plot(layer=i)` draws one layer's heads side
# by side.)

# %%
at_cls = sweep["z"].select(batch=0, token=0)  # [layer, head]
L, H = divmod(int(at_cls.values.argmax()), at_cls.values.shape[1])
print(f"the head whose output at CLS brings back most: L{L}H{H} ({float(at_cls.values[L, H]):.3f}); "
      f"the whole attention output of layer {L} at CLS: {float(sweep['attn_out'].values[0, L, 0]):.3f}")
at_cls.plot(title="z patched at the CLS token, by layer and head")

# %% [markdown]
# ## 2. Groups of positions: rows, and the object
#
# Single tokens can miss what only a group carries. `positions="rows"` patches each row of
# patches as one group (`"cols"` each column), and a boolean mask on the patch grid patches the
# masked patches together. Here the mask is every patch that either object touches: at layer 0
# the other patches hold the same pixels in both scenes, so this group must bring back all of
# the circle (a check on the machinery). The interesting part is the layers after it.

# %%
rows = px.activation_patching(model, clean, corrupted, metric, sites=("resid_pre", "attn_out", "mlp_out"),
                              positions="rows", normalize=True, progress=False)
print(rows["resid_pre"].to_dataframe().pivot(index="layer", columns="position", values="value").round(2)
      .to_string())
rows["resid_pre"].plot(title="resid_pre, one row of patches at a time")

# %%
on_object = torch.nn.functional.max_pool2d(covered[None, None].float(), layout.patch_size)[0, 0] > 0
obj = px.activation_patching(model, clean, corrupted, metric, sites=("resid_pre",), positions=on_object,
                             normalize=True, progress=False)["resid_pre"]
print(f"{int(on_object.sum())} of {layout.n_patches} patches touch an object")
object_by_layer = obj.values[0, :, 0]
cls_by_layer = sweep["resid_pre"].values[0, :, 0]
for layer in range(model.cfg.n_layers):
    print(f"  resid_pre L{layer}: the object's patches together {float(object_by_layer[layer]):6.3f}, "
          f"the CLS token alone {float(cls_by_layer[layer]):6.3f}")
assert abs(float(object_by_layer[0]) - 1) < 1e-3  # every differing patch at the embedding: all of it
handoff = next((i for i in range(model.cfg.n_layers) if cls_by_layer[i] > object_by_layer[i]), None)
print("the CLS token first carries more than the object's patches at layer", handoff)

# %% [markdown]
# ## 3. Denoising and noising
#
# So far we pasted clean activations into the corrupted run (**denoising**, the default). With
# `direction="noising"` the corrupted activation goes into the clean run instead. The scale stays
# the same (0 = corrupted run, 1 = clean run), so in noising a cell near 1 means "breaking this
# changed nothing" and `1 - value` is the share of the circle that it destroys.
#
# The two answer different questions. Denoising: is this activation *sufficient* to bring the
# circle back into a square run? Noising: is it *necessary*, does the circle fall apart without
# it? A cell high in both is a bottleneck. A cell that is sufficient but not necessary holds
# information that is also held elsewhere (redundant copies: any one of them will do). A cell
# that is necessary but not sufficient works only together with others.

# %%
noising = px.activation_patching(model, clean, corrupted, metric, sites=SITES, positions="all",
                                 normalize=True, direction="noising", progress=False)
both = sweep.to_dataframe()
other = noising.to_dataframe()
keys = ["site", "batch", "layer", "head", "token"]
assert both[keys].fillna(-1).equals(other[keys].fillna(-1))  # same cells, same order
both = both.rename(columns={"value": "sufficient"}).assign(necessary=1 - other["value"])
both["head"] = both["head"].astype("Int64")


def reading(row) -> str:
    s, n = row["sufficient"] >= 0.5, row["necessary"] >= 0.5
    return {(True, True): "bottleneck", (True, False): "sufficient, not necessary",
            (False, True): "necessary, not sufficient"}.get((s, n), "partial")


strongest = both.reindex(both[["sufficient", "necessary"]].abs().max(axis=1).sort_values(ascending=False).index)
strongest = strongest.head(12).assign(reading=lambda d: d.apply(reading, axis=1))
print(strongest[["site", "layer", "head", "token", "sufficient", "necessary", "reading"]].round(3)
      .to_string(index=False))

# %%
obj_noising = px.activation_patching(model, clean, corrupted, metric, sites=("resid_pre",), positions=on_object,
                                     normalize=True, direction="noising", progress=False)["resid_pre"]
print(pd.DataFrame({"object patches: sufficient": object_by_layer,
                    "object patches: necessary": 1 - obj_noising.values[0, :, 0],
                    "CLS: sufficient": cls_by_layer,
                    "CLS: necessary": 1 - noising["resid_pre"].values[0, :, 0]},
                   index=pd.Index(obj.labels("layer"), name="layer")).round(3).to_string())

# %% [markdown]
# Read the "sufficient" and "necessary" columns side by side. Where both are high, that
# activation is the one route the answer takes at its layer. If the `reading` column (0.5 is
# its line) shows a single object patch that is sufficient but not necessary, the two classes
# are not built alike: one patch of the circle pasted into the square is enough to undo the
# square, while one patch of the square pasted into the circle is not enough to undo the circle.
# One reading that fits shapes: a square needs all of its straight edges and corners, so any
# round patch breaks it.

# %% [markdown]
# ## 4. The same sweep on the nnsight backend
#
# `backend="nnsight"` wraps the original timm module (weights untouched) with nnsight and reads
# the same site names off its submodules. It batches the patched runs the same way but runs each
# from the input (nnsight traces whole forward passes), where the TransformerLens backend
# restarts at the patched layer. The numbers should agree.

# %%
traced = px.load("builtin:shapes-vit", backend="nnsight")
print(type(traced).__name__, "with", len(traced.site_names), "sites")
start = time.perf_counter()
again = px.activation_patching(traced, clean, corrupted, metric, sites=SITES, positions="all", normalize=True,
                               progress=False)
seconds_nnsight = time.perf_counter() - start
start = time.perf_counter()
px.activation_patching(model, clean, corrupted, metric, sites=SITES, positions="all", normalize=True, progress=False)
seconds_tl = time.perf_counter() - start
gap = max(float((again[s].values - sweep[s].values).abs().max()) for s in SITES)
cells = sum(r.values.numel() for r in sweep.results())
print(f"{cells} cells; largest difference between the backends: {gap:.1e}")
print(f"restarting at the patched layer: {sweep.meta['reuse']} (TransformerLens), {again.meta['reuse']} (nnsight); "
      f"this run took {seconds_tl:.2f} s and {seconds_nnsight:.2f} s")
assert gap < 1e-4

# %% [markdown]
# ## 5. Targets: the same sweep, written three ways
#
# Patching takes what every other method takes as `target=`: a class, `px.LogitDiff(a, b)` with
# class indices or names, `px.ClassProb(c)`, `None` for each clean image's predicted class, or a
# plain function of the output `fn(logits) -> [n]`. A logit difference written any of these ways
# is the same sweep.

# %%
ways = {
    'px.LogitDiff("circle", "square")': px.LogitDiff(A, B),
    "px.LogitDiff(a, b)": px.LogitDiff(a, b),
    "lambda logits: logits[:, a] - logits[:, b]": lambda logits: logits[:, a] - logits[:, b],
}
for label, way in ways.items():
    same = px.activation_patching(model, clean, corrupted, way, sites=SITES, positions="all", normalize=True,
                                  progress=False)
    gap = max(float((same[s].values - sweep[s].values).abs().max()) for s in SITES)
    print(f"{label:>44}: largest difference from the sweep above: {gap:.1e}")

# a class alone is another target: that class's logit, which also moves with what every class shares
alone = px.activation_patching(model, clean, corrupted, A, sites=("resid_pre",), positions="all", normalize=True,
                               progress=False)["resid_pre"]
print(f"resid_pre at CLS by layer, target {A!r}:", [round(float(v), 3) for v in alone.values[0, :, 0]],
      "| logit difference:", [round(float(v), 3) for v in cls_by_layer])

# %% [markdown]
# ## 6. Attribution patching against the exact sweep
#
# `px.attribution_patching` takes the same arguments and returns the same axes, but estimates
# every cell at once from gradients: metric(corrupted) + (a_clean - a_corrupted) . dmetric/da.
# With `steps=1` (classic attribution patching) the gradient is taken at the corrupted run: one
# forward and one backward pass for the whole sweep. With `steps=8` it is averaged over eight
# inputs spaced along the straight line from the corrupted image to the clean one (the input
# interpolation of EAP-IG): eight forward and backward passes, still no loop over cells.
#
# We compare both with the exact sweep on all six pairs at once (a batch of clean images and a
# batch of corrupted ones), as the Pearson correlation over every cell of each site.

# %%
clean6 = torch.cat([p[1] for p in pairs])
corrupted6 = torch.cat([p[2] for p in pairs])
start = time.perf_counter()
exact = px.activation_patching(model, clean6, corrupted6, metric, sites=SITES, positions="all", normalize=True,
                               progress=False)
seconds = {"exact": time.perf_counter() - start}
estimates = {}
for steps in (1, 8):
    start = time.perf_counter()
    estimates[steps] = px.attribution_patching(model, clean6, corrupted6, metric, sites=SITES, positions="all",
                                               normalize=True, steps=steps, progress=False)
    seconds[f"steps={steps}"] = time.perf_counter() - start


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1])


agreement = pd.DataFrame({site: [pearson(estimates[k][site].values, exact[site].values) for k in estimates]
                          for site in SITES}, index=pd.Index([f"steps={k}" for k in estimates], name="Pearson r"))
print(agreement.round(3).to_string())
print("seconds:", {k: round(v, 2) for k, v in seconds.items()})

# %% [markdown]
# Compare the two rows: they say how far the tangent at the corrupted run is from the real
# effect of each patch, site by site, and whether averaging the gradient along the path helps
# on this model (it need not help every site). A residual-stream token swapped between two
# images is a large change that the next LayerNorm does not follow linearly, so a single
# gradient can misjudge it.
#
# Whatever the correlation, the estimate is for **ranking**: take its strongest cells and confirm
# them with exact patching, which is cheap when restricted to a few cells (`layers=`, `heads=`,
# `positions=`). First, over all cells: take the cells whose exact effect is at least 0.5, and
# see how many of them each estimate ranks that high; then the strongest estimated cells next to
# their exact values.

# %%
ranked = exact.to_dataframe().rename(columns={"value": "exact"})
for k in estimates:
    ranked[f"steps={k}"] = estimates[k].to_dataframe()["value"]
ranked["head"] = ranked["head"].astype("Int64")
strong = ranked["exact"].abs() >= 0.5
for k in estimates:
    picked = ranked[f"steps={k}"].abs().nlargest(int(strong.sum())).index
    print(f"steps={k}: of its {int(strong.sum())} strongest cells, {int(strong[picked].sum())} are among the "
          f"{int(strong.sum())} with an exact effect of 0.5 or more")
shown = ranked.reindex(ranked["steps=8"].abs().sort_values(ascending=False).index).head(6)
print(shown[["site", "batch", "layer", "head", "token", "steps=1", "steps=8", "exact"]].round(3).to_string(index=False))

# %%
z_mean = estimates[8]["z"].values.mean(0)  # [layer, head, token], averaged over the pairs
zl, zh, zt = (int(i) for i in torch.unravel_index(z_mean.abs().argmax(), z_mean.shape))
token_label = estimates[8]["z"].labels("token")[zt]
confirm = px.activation_patching(model, clean6, corrupted6, metric, sites=("z",), layers=[zl], heads=[zh],
                                 positions=[zt], normalize=True, progress=False)["z"]
print(f"strongest head by the 8-step estimate (mean over pairs): L{zl}H{zh} at {token_label}")
print("  estimate per pair:", [round(float(v), 3) for v in estimates[8]["z"].values[:, zl, zh, zt]])
print("  exact per pair:   ", [round(float(v), 3) for v in confirm.values[:, 0, 0, 0]])

# %% [markdown]
# ## 7. CLIP: patching the image side and the text side
#
# `builtin:shapes-clip` was trained on captions from a few templates (printed below), so its
# prompts should follow them. `px.image_text_patching` builds the metric for you:
#
# - `tower="visual"`: two images and two prompts; the metric is CLIP's logit scale times
#   cos(image, prompt 0) - cos(image, prompt 1).
# - `tower="text"`: two prompts and a fixed image; the metric is the scaled cos(image, prompt).
#   Prompts are patched position by position, so each clean/corrupted pair must have the same
#   number of tokens (end-of-text at the same place); otherwise it refuses, naming the lengths.
#
# On the vision side we also put the best single patch at the embedding next to the
# classifier's from section 1: two models trained on the same scenes for different objectives
# need not spread the shape over the patches the same way.

# %%
clip = px.load("builtin:shapes-clip")
print("training captions:", zoo.info("shapes-clip")["zero_shot"]["captions"])
clip_clean, clip_corrupted, _ = pair(seed, "shapes-clip")
prompts = [f"a photo of a {A}", f"a photo of a {B}"]
with torch.no_grad():
    logits = clip(torch.cat([clip_clean, clip_corrupted]), prompts)  # [image, prompt]
print(pd.DataFrame(logits.numpy(), index=[f"{A} image", f"{B} image"], columns=prompts).round(2).to_string())

# %%
vision = px.image_text_patching(clip, clip_clean, clip_corrupted, prompts, sites=SITES, normalize=True,
                                progress=False)
print(f"metric: {float(vision.meta['clean_metric'][0]):.2f} on the {A} image, "
      f"{float(vision.meta['corrupted_metric'][0]):.2f} on the {B} image")
vt = vision.to_dataframe()
vt["head"] = vt["head"].astype("Int64")
print(vt.reindex(vt["value"].abs().sort_values(ascending=False).index).head(8)[
    ["site", "layer", "head", "token", "value"]].round(3).to_string(index=False))
best_patch = {"classifier": float(sweep["resid_pre"].values[0, 0, layout.n_prefix:].max()),
              "CLIP vision tower": float(vision["resid_pre"].values[0, 0, layout.n_prefix:].max())}
print("the best single patch at the embedding brings back:", {k: round(v, 3) for k, v in best_patch.items()})
vision["resid_pre"].plot(title="CLIP vision tower, resid_pre: circle image patched into the square image")

# %% [markdown]
# The text tower: one call, two prompt pairs against the circle image. In the first pair the
# shape word changes, in the second the colour word; denoising pastes the clean prompt's
# activations into the corrupted prompt's run. The text tower is causal and reads its answer at
# the end-of-text token, so watch where the changed word's information sits at each layer.

# %%
clean_prompts = [f"a red {A}", f"a red {A}"]
corrupted_prompts = [f"a red {B}", f"a blue {A}"]
text = px.image_text_patching(clip, clean_prompts, corrupted_prompts, images=clip_clean, tower="text",
                              sites=SITES, normalize=True, progress=False)
n_positions = text["resid_pre"].values.shape[-1]
words = ["<start>", *clean_prompts[0].split(), "<end>"]
assert len(words) == n_positions, "one token per word in these prompts"
ends = zip(text.meta["clean_metric"].tolist(), text.meta["corrupted_metric"].tolist())
print("metric (clean, corrupted) per pair:", [(round(c, 2), round(k, 2)) for c, k in ends])
for i, (c, k) in enumerate(zip(clean_prompts, corrupted_prompts)):
    grid = pd.DataFrame(text["resid_pre"].values[i].numpy(), columns=words,
                        index=pd.Index(text["resid_pre"].labels("layer"), name="layer"))
    print(f"\n{c!r} into {k!r}, resid_pre:\n{grid.round(3).to_string()}")

# %%
pxp.imshow(text["resid_pre"].values.numpy(), facet_col=0, x=words,
           y=[f"L{i}" for i in text["resid_pre"].labels("layer")], color_continuous_scale="RdBu_r",
           color_continuous_midpoint=0.0, title="CLIP text tower, resid_pre: left shape word, right colour word")

# %%
try:
    px.image_text_patching(clip, [f"a red {A}"], [f"a photo of a {B}"], images=clip_clean, tower="text",
                           progress=False)
except px.errors.InputError as err:
    print("refused:", err)

# %% [markdown]
# Next: docs/patching.md has every option (`layers`, `heads`, `batch_size`, position groups as
# dicts of labelled token lists) and how the batched sweep is made fast; docs/nnsight.md covers
# the nnsight backend beyond patching.
