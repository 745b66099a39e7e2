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
# # Tutorial 3: a tour of attention head types
#
# A ViT's heads do recognisably different jobs. Some park their attention on the CLS token or
# registers (a "sink": they mostly leave the patches alone), some look at their own or
# neighbouring patches (self, local: positional heads), some spread it evenly (global
# averaging), and some pick out particular content wherever it is. Which of these a model has
# depends on its size and training; the small built-in model below has only some of them (the
# counts are printed). We measure each head over a batch of scenes, sort the heads into these
# rough types, find the heads that follow the object, then check which heads *matter* by
# ablating them.
#
# The statistics are `px.head_statistics` (`prisma_ext.analysis.heads`; the report's head gallery
# uses them, and `prisma_ext.viz.heads` draws them):
# `to_prefix`, `to_self`, `entropy` (1 = uniform) and `distance` (mean query-key distance in
# patches, relative to uniform attention) over the patch queries.

# %%
import torch

import prisma_ext as px
from prisma_ext import zoo
from prisma_ext.viz.heads import head_gallery, head_type_figure

model = px.load("builtin:shapes-vit")
names = list(model.class_names)
layout = model.layout
scenes = zoo.heldout("shapes-vit", n=64, seed=11)
images = zoo.normalize(scenes.images, "shapes-vit")

patterns = px.head_patterns(model, images, mean=False)  # values [batch, layer, head, query, key]
stats = px.head_statistics(patterns).to_dataframe()  # per image, then averaged; one row per head
print(stats.round(3).to_string(index=False))
print(stats["type"].value_counts().to_string())

# %%
head_type_figure(stats)

# %% [markdown]
# ## What the classifier's query sees
#
# The CLS row of each head's pattern, over the patches: one panel per head, labelled with its
# type. (For an average-pool model this is the mean over the pooled queries.)

# %%
readout = px.readout_attention(model, images, patterns=patterns.mean_over("batch"))  # [layer, head, patch]
head_gallery(readout, stats=stats)

# %% [markdown]
# ## Object heads
#
# The statistics above are averages over positions; the scenes also tell us where the object
# is. For each head: the share of the CLS query's attention over patches that lands on the
# object's patches, image by image, against the share of patches the object covers. A ratio
# well above 1 marks a head that finds the object wherever it is.

# %%
_, cache = model.run_with_cache(images, names_filter=lambda n: n.endswith("hook_pattern"))
touched = torch.nn.functional.avg_pool2d(scenes.masks[:, None].float(), layout.patch_size)[:, 0] > 0
touched = touched.flatten(1).float()  # [batch, patch]
area = touched.mean(1)  # [batch]
ratios = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
for layer in range(model.cfg.n_layers):
    cls_rows = cache[f"blocks.{layer}.attn.hook_pattern"][:, :, 0, layout.n_prefix:]  # [batch, head, patch]
    share = (cls_rows * touched[:, None]).sum(-1) / cls_rows.sum(-1)  # [batch, head]
    ratios[layer] = (share / area[:, None]).mean(0)
stats["object_ratio"] = ratios.flatten().tolist()
best = stats.sort_values("object_ratio", ascending=False).iloc[0]
print(f"most object-focused: L{int(best['layer'])}H{int(best['head'])} ({best['type']}), "
      f"{best['object_ratio']:.1f}x the attention its area would get")

# %% [markdown]
# ## Which heads matter: ablation
#
# Replace one head's output (`hook_z`) by its mean over the batch, for every head in turn, and
# measure the accuracy. A sink or global head can usually go at little cost; a head that finds
# the object should cost more.

# %%
labels = scenes.labels
with torch.no_grad():
    base = (model(images).argmax(-1) == labels).float().mean().item()
    _, z_cache = model.run_with_cache(images, names_filter=lambda n: n.endswith("attn.hook_z"))
rows = []
for layer in range(model.cfg.n_layers):
    z_mean = z_cache[f"blocks.{layer}.attn.hook_z"].mean(0, keepdim=True)
    for head in range(model.cfg.n_heads):

        def mean_ablate(z, hook, head=head, z_mean=z_mean):
            z[:, :, head] = z_mean[:, :, head]
            return z

        with torch.no_grad():
            logits = model.run_with_hooks(images, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", mean_ablate)])
        rows.append(base - (logits.argmax(-1) == labels).float().mean().item())
stats["accuracy_drop"] = rows
print(f"accuracy {base:.0%}; by head type, the mean accuracy lost when the head is mean-ablated:")
print(stats.groupby("type")[["accuracy_drop", "object_ratio"]].mean().round(3).to_string())
print(stats.sort_values("accuracy_drop", ascending=False).head(5).round(3).to_string(index=False))

# %% [markdown]
# ## The same on the nnsight backend
#
# `head_patterns` and the report's gallery go through the analysis backend, so a model loaded
# with `backend="nnsight"` gives the same patterns (read from the original timm module).

# %%
traced = px.load("builtin:shapes-vit", backend="nnsight")
torch.testing.assert_close(px.head_patterns(traced, images[:8]).values, px.head_patterns(model, images[:8]).values,
                           atol=1e-5, rtol=1e-4)
print("nnsight backend: same patterns")
