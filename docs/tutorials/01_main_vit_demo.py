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
# # Tutorial 1: what a ViT looks at, and a patch that proves it
#
# We take the built-in classifier `builtin:shapes-vit` (a small timm ViT trained on
# `prisma_ext.data` scenes, shipped in the package) and one of its scenes, and ask three
# questions:
#
# 1. **Which components write the answer?** Direct logit attribution by layer and head.
# 2. **Where do those heads look?** Their attention patterns on the patch grid.
# 3. **Is that the cause?** Activation patching between a minimal pair of scenes (the same
#    canvas with a circle or a square in the same place), down to the fewest patches that flip
#    the prediction.
#
# Read it with its outputs in `01_main_vit_demo.ipynb` (the notebook of this script, stored with
# its tables and figures), run it as a script (`python docs/tutorials/01_main_vit_demo.py`), or
# open the script as a notebook with Jupytext; every cell's last expression is a plotly figure
# or a table in a notebook.

# %%
import torch

import prisma_ext as px
from prisma_ext import zoo
from prisma_ext.data.scenes import make_scenes

model = px.load("builtin:shapes-vit")
names = list(model.class_names)
print(model.summary())
print(model.layout.describe())
print("classes:", names)

# %% [markdown]
# ## A minimal pair of scenes
#
# `make_scenes` draws from a seed; with one class and one colour, the same seed puts any object
# at the same place, at the same size, in the same colour. So the two images below differ only
# in the object's shape. We look for a seed where the model gets both right.

# %%
size = model.cfg.img_size[0]
A, B = "circle", "square"
a, b = names.index(A), names.index(B)


def scene(obj: str, seed: int):
    """One scene of `obj` (red), and the model's input for it."""
    s = make_scenes(1, seed=seed, size=size, classes=[obj], colours=["red"])
    return s, zoo.normalize(s.images, "shapes-vit")  # [0, 1] pixels -> the model's input


for seed in range(50):
    clean_scene, clean = scene(A, seed)
    corrupted_scene, corrupted = scene(B, seed)
    with torch.no_grad():
        if model(clean).argmax() == a and model(corrupted).argmax() == b:
            break
print(f"seed {seed}: {clean_scene.captions[0]!r} is read as {A}, {corrupted_scene.captions[0]!r} as {B}")

# %% [markdown]
# ## 1. Direct logit attribution
#
# The circle's logit, split into what each component writes directly into it (the final norm's
# scale frozen, as TransformerLens does): the embedding, every head, every MLP, the biases.
# The parts add up to the logit exactly.

# %%
dla = px.direct_logit_attribution(model, clean, target=A, by=("layer", "head", "source"))
table = dla.to_dataframe()
print(table.reindex(table["value"].abs().sort_values(ascending=False).index).head(8).to_string(index=False))
assert abs(float(dla.values.sum()) - float(dla.meta["score"][0])) < 1e-3

# %%
heads = dla.part("head")  # [batch, layer, head]
heads.plot(title="direct logit attribution of 'circle' by head")

# %% [markdown]
# `LogitDiff(a, b)` explains the *difference* between two classes: what makes it a circle
# rather than a square.

# %%
diff = px.direct_logit_attribution(model, clean, target=px.LogitDiff(A, B), by=("layer",))
diff.plot(title="circle minus square, by component")

# %% [markdown]
# ## 2. Where the important heads look
#
# The head that writes most into the logit, and its attention from the CLS token (the token the
# classifier reads) over the patches. `part("source")` of the attribution splits each head's
# contribution over the tokens it reads: the "CLS attribution".

# %%
head_values = heads.values[0]
layer, head = divmod(int(head_values.abs().argmax()), head_values.shape[1])
_, cache = model.run_with_cache(clean)
layout = model.layout
cls_row = cache[f"blocks.{layer}.attn.hook_pattern"][0, head, 0, layout.n_prefix:].reshape(layout.grid)

# patches that the object touches
mask = torch.nn.functional.avg_pool2d(clean_scene.masks[:1, None].float(), layout.patch_size)[0, 0] > 0
on_object = float(cls_row[mask].sum() / cls_row.sum())
print(f"L{layer}H{head}: {on_object:.0%} of its CLS attention (over patches) lands on the object's "
      f"{int(mask.sum())} of {layout.n_patches} patches")

# %%
source = dla.part("source").values[0]  # [layer, head, token]
cls_attribution = source[layer, head, layout.n_prefix:].reshape(layout.grid)
import plotly.express as pxp  # noqa: E402

pxp.imshow(torch.stack([cls_row, cls_attribution]).detach().numpy(), facet_col=0,
           color_continuous_scale="RdBu_r", color_continuous_midpoint=0.0,
           title=f"L{layer}H{head}: CLS attention (left) and CLS attribution (right)")

# %% [markdown]
# ## 3. Activation patching: is it the cause?
#
# Run the square scene, and copy in the circle scene's residual stream at one token and one
# layer; the metric is logit(circle) - logit(square), normalised so that 0 is the square run
# and 1 the circle run. The TL backend restarts each patched run at the patched layer, and
# batches many runs per forward pass.

# %%
metric = px.LogitDiff(a, b)
sweep = px.activation_patching(model, clean, corrupted, metric, sites=("resid_pre",),
                               positions="all", normalize=True, progress=False)
per_token = sweep["resid_pre"]  # [batch, layer, token]
cls_by_layer = per_token.values[0, :, 0]
print("patching only the CLS token, layer by layer:", [round(float(v), 2) for v in cls_by_layer])
per_token.plot(title="patching one token's residual stream into the square run")

# %% [markdown]
# Early on, the circle lives in the object's patches; by the last layer the CLS token alone
# carries it. Now the **minimal patch**: paste the circle scene's patches into the square scene
# at the embedding (the patch tokens entering layer 0), k of them at a time, for every k at once
# (one batched sweep); the smallest k that makes the model say "circle" is the answer. The
# order: patches whose pixels differ first (an identical patch cannot change anything at layer
# 0), each by the size of its own effect above. Size, not sign: the square's corners outside the
# circle must go too, and alone each may even help the square.

# %%
effect = per_token.values[0, 0, layout.n_prefix:].abs()
pixels_differ = (clean - corrupted).abs().amax(1, keepdim=True)  # [1, 1, H, W]
differs = torch.nn.functional.max_pool2d(pixels_differ, layout.patch_size).flatten() > 0
order = torch.tensor(sorted(range(layout.n_patches), key=lambda i: (not differs[i], -float(effect[i]))))
groups = {str(k): (order[:k] + layout.n_prefix).tolist() for k in range(1, layout.n_patches + 1)}


def predicts_a(output: torch.Tensor) -> torch.Tensor:
    return (output.argmax(-1) == a).float()


flips = px.activation_patching(model, clean, corrupted, predicts_a, sites=("resid_pre",), layers=[0],
                               positions=groups, progress=False)["resid_pre"].values[0, 0]
k = int(flips.nonzero()[0]) + 1
chosen = torch.zeros(layout.n_patches, dtype=torch.bool)
chosen[order[:k]] = True
inside = int((chosen & mask.flatten()).sum())
print(f"pasting {k} of {layout.n_patches} patches flips {B} -> {A}; {inside} of them touch the object")

# %% [markdown]
# Check it with a plain hook: paste those patches' embeddings and read the prediction.

# %%
_, clean_cache = model.run_with_cache(clean, names_filter="blocks.0.hook_resid_pre")
tokens = (order[:k] + layout.n_prefix).tolist()


def paste(resid, hook):
    resid[:, tokens] = clean_cache[hook.name][:, tokens]
    return resid


patched = model.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.hook_resid_pre", paste)])
print("prediction with the patch:", names[int(patched.argmax())])
assert int(patched.argmax()) == a

# %% [markdown]
# Next: `02_patch_logit_lens.py` reads every patch through the classifier, layer by layer;
# `03_attention_head_tour.py` sorts the heads into types. `prisma-ext report` puts all of the
# above (and Captum's maps) into one HTML file.
