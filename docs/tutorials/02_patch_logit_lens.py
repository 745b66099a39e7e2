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
# # Tutorial 2: the patch logit lens, layer by layer
#
# The logit lens reads a residual stream through the model's final norm and classifier head, as
# if the model stopped there. In a ViT every *patch* can be read this way, so the lens becomes a
# map: at each layer, what class each patch's residual stream already points to.
#
# `px.logit_lens(model, images)` returns values [batch, layer, token, class]: layer "embed" is
# the stream entering block 0, "L{i}" the stream after block i; `part("pooled")` is the
# model's own readout (its pooling, then norm and head) at each layer, which at the last layer
# equals the model's logits.

# %%
import torch

import prisma_ext as px
from prisma_ext import zoo

model = px.load("builtin:shapes-vit")
names = list(model.class_names)
scenes = zoo.heldout("shapes-vit", n=48)  # scenes like the training data, with masks and captions
images = zoo.normalize(scenes.images, "shapes-vit")
labels = scenes.labels

lens = px.logit_lens(model, images)
print(lens)

# %% [markdown]
# ## The pooled readout, layer by layer
#
# `summary(target)` gives, per layer: the pooled readout's top-1 accuracy on the labels, the
# mean rank of the true class (0 = top), and the fraction of patches whose own readout ranks
# it first.

# %%
summary = lens.summary(target=labels)
print(summary.to_string(index=False))
with torch.no_grad():
    final = model(images)
torch.testing.assert_close(lens.part("pooled").values[:, -1], final, atol=1e-4, rtol=1e-4)
assert summary["accuracy"].iloc[-1] >= summary["accuracy"].iloc[0]

# %% [markdown]
# ## Object patches and background patches
#
# Each scene comes with the object's mask, so we can split the patches: the ones the object
# touches, and the rest. Per layer: how often an object patch's own readout already names the
# right class, and how often a background patch does.

# %%
layout = model.layout
touched = torch.nn.functional.avg_pool2d(scenes.masks[:, None].float(), layout.patch_size)[:, 0] > 0
touched = touched.flatten(1)  # [batch, patch]
patch_top = lens.values[:, :, layout.n_prefix:].argmax(-1)  # [batch, layer, patch]
right = patch_top == labels[:, None, None]
for i, layer in enumerate(lens.labels("layer")):
    on = right[:, i][touched].float().mean()
    off = right[:, i][~touched].float().mean()
    print(f"{layer:>5}: object patches right {on:.0%}, background patches right {off:.0%}")

# %% [markdown]
# ## One image, every layer
#
# The plot shows the logit of one class on the patch grid, one panel per layer, each patch
# labelled with its own top class. Here: the first scene, its true class.

# %%
first = int(labels[0])
print("scene 0:", scenes.captions[0])
one = px.logit_lens(model, images[:1])
print("top class per patch at the last layer:")
for row in one.top_k(k=1, layer=-1):
    print("  ", " ".join(f"{label:>8}" for label in row))
one.plot(cls=first)

# %% [markdown]
# ## A subset of classes, and the CLS token
#
# `classes=` keeps a few classes (by name or index). The CLS token (token 0) is what the
# classifier reads; its lens shows when the answer arrives there.

# %%
pair = px.logit_lens(model, images[:1], classes=names[:2])
cls_logits = pair.values[0, :, 0]  # [layer, 2]
for layer, row in zip(pair.labels("layer"), cls_logits.tolist()):
    print(f"{layer:>5}: " + ", ".join(f"{n} {v:+.2f}" for n, v in zip(names[:2], row)))

# %% [markdown]
# ## CLIP: the lens against text
#
# A CLIP model has no classifier, but a zero-shot head makes one: the class prompts' text
# embeddings become the vision tower's unembedding, and each patch is read against them.
# `zoo.use_zero_shot_head` installs the built-in CLIP's classes and prompt templates.

# %%
clip = px.load("builtin:shapes-clip")
zoo.use_zero_shot_head(clip, "shapes-clip")
clip_images = zoo.normalize(scenes.images, "shapes-clip")
clip_lens = px.logit_lens(clip, clip_images)
print(clip_lens.summary(target=labels).to_string(index=False))

# %% [markdown]
# The lens works the same on the nnsight backend (`px.load(..., backend="nnsight")`).
