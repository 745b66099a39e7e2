"""`px.load`: one entry point from a source (a name or a module) to a model on either backend."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .errors import PrismaError

BACKENDS = ("tl", "nnsight")
HOOKED_OPTIONS = ("fold_ln", "center_writing_weights", "fold_value_biases", "use_attn_result",
                  "device", "dtype")


def load(source: str | nn.Module, backend: str = "tl", pretrained: bool | str | os.PathLike = True,
         remote: bool | str = False, **kwargs: Any):
    """Load a ViT or CLIP model: a hooked model (HookedViT / HookedCLIP, backend "tl") or the
    original module traced by nnsight (TracedViT / TracedCLIP, backend "nnsight").

    `source`: "timm:NAME" (any timm VisionTransformer config, e.g. "timm:vit_small_patch16_224",
    tags allowed: "timm:vit_small_patch16_224.augreg_in21k_ft_in1k"), "open_clip:ARCH" or
    "open_clip:ARCH/TAG" (e.g. "open_clip:ViT-B-32/openai"), "hf:REPO_OR_DIR" (a Hugging Face
    CLIPModel, CLIPVisionModel, ViTForImageClassification or ViTModel), "builtin:NAME" (the
    models in `prisma_ext.zoo`), a prefix registered with `prisma_ext.sources.register_source`,
    or a module instance any registered adapter recognises.
    `pretrained`: True for the source's published weights, False for random ones, or a path to a
    local checkpoint. `kwargs`: HookedViT options (fold_ln, center_writing_weights,
    fold_value_biases, use_attn_result, device, dtype); the rest goes to the source's
    constructor (e.g. img_size=..., num_classes=..., dynamic_img_size=True for timm).
    `remote` (nnsight backend, "hf:REPO_ID" CLIP and ViT checkpoints): True to run traces on NDIF,
    "local" for nnsight's local simulation of that round trip; the model is then built without
    weights (a `RemoteTracedCLIP` or `RemoteTracedViT`; `revision=` picks the checkpoint revision).
    """
    if backend not in BACKENDS:
        raise PrismaError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    options = {k: kwargs.pop(k) for k in HOOKED_OPTIONS if k in kwargs}
    if remote:
        if backend != "nnsight":
            raise PrismaError("remote execution runs nnsight traces: pass backend='nnsight' with remote=...")
        from .traced.remote import load_remote

        return load_remote(source, pretrained, remote, options, kwargs)
    if isinstance(source, nn.Module):
        if kwargs:
            raise PrismaError(f"constructor arguments {sorted(kwargs)} only apply to a named source")
        module = source
    elif isinstance(source, str):
        from .sources import build_named

        module = build_named(source, pretrained, kwargs)
    else:
        raise PrismaError(f"source must be a name like 'timm:vit_small_patch16_224' or a torch module, "
                          f"got {type(source).__name__}")
    from .adapters import adapter_for

    adapter = adapter_for(module)
    if backend == "nnsight":
        from .traced.build import wrap

        return wrap(module, adapter, **options)
    return adapter.to_hooked(module, **options)
