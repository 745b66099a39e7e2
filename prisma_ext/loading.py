"""`px.load`: one entry point from a source (a name or a module) to a model on either backend."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .errors import PrismaError, UnsupportedModelError

BACKENDS = ("tl", "nnsight")
HOOKED_OPTIONS = ("fold_ln", "center_writing_weights", "fold_value_biases", "use_attn_result",
                  "device", "dtype")


def load(source: str | nn.Module, backend: str = "tl", pretrained: bool | str | os.PathLike = True,
         remote: bool | str = False, verify: bool = True, **kwargs: Any):
    """Load a ViT or CLIP model: a hooked model (HookedViT / HookedCLIP, backend "tl") or the
    original module traced by nnsight (TracedViT / TracedCLIP, backend "nnsight").

    `source`: "timm:NAME" (any timm VisionTransformer config, e.g. "timm:vit_small_patch16_224",
    tags allowed: "timm:vit_small_patch16_224.augreg_in21k_ft_in1k"), "open_clip:ARCH" or
    "open_clip:ARCH/TAG" (e.g. "open_clip:ViT-B-32/openai"), "hf:REPO_OR_DIR" (a Hugging Face
    CLIPModel, CLIPVisionModel, ViTForImageClassification or ViTModel, ...; a
    LlavaForConditionalGeneration on the nnsight backend only, a `TracedLlava`), "builtin:NAME" (the
    models in `prisma_ext.zoo`), a prefix registered with `prisma_ext.sources.register_source`,
    or a module instance any registered adapter recognises.
    `pretrained`: True for the source's published weights, False for random ones, or a path to a
    local checkpoint. `kwargs`: HookedViT options (fold_ln, center_writing_weights,
    fold_value_biases, use_attn_result, device, dtype); the rest goes to the source's
    constructor (e.g. img_size=..., num_classes=..., dynamic_img_size=True for timm).
    `remote` (nnsight backend, "hf:REPO_ID" CLIP and ViT checkpoints): True to run traces on NDIF,
    "local" for nnsight's local simulation of that round trip; the model is then built without
    weights (a `RemoteTracedCLIP` or `RemoteTracedViT`; `revision=` picks the checkpoint revision).
    `verify` (default True): check the loaded model against the source's own forward on a small
    seeded probe (`prisma_ext.verification`) and raise `VerificationError` naming the first block
    or site that diverges; False skips it (remote models, which hold no weights here, skip it).
    """
    if backend not in BACKENDS:
        raise PrismaError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    options = {k: kwargs.pop(k) for k in HOOKED_OPTIONS if k in kwargs}
    if remote:
        if backend != "nnsight":
            raise PrismaError("remote execution runs nnsight traces: pass backend='nnsight' with remote=...")
        from .traced.remote import load_remote

        return load_remote(source, pretrained, remote, options, kwargs)
    try:
        return _load(source, backend, pretrained, verify, options, kwargs)
    except UnsupportedModelError as err:
        if not isinstance(source, str) or "closest supported" in str(err):
            raise
        from .sources import closest_supported

        near = closest_supported(source)
        if not near:
            raise
        prefix = source.partition(":")[0]
        raise UnsupportedModelError(f"{err}; closest supported: {', '.join(f'{prefix}:{n}' for n in near)}") from None


def _load(source: str | nn.Module, backend: str, pretrained: Any, verify: bool, options: dict[str, Any],
          kwargs: dict[str, Any]):
    if isinstance(source, nn.Module):
        if kwargs:
            raise PrismaError(f"constructor arguments {sorted(kwargs)} only apply to a named source")
        module = source
    elif isinstance(source, str):
        from .sources import build_named

        if backend == "tl" and source.startswith("hf:"):  # refused by its config, before any weights load
            from .sources.hf import tl_refusal

            why = tl_refusal(source[len("hf:"):], pretrained)
            if why:
                raise UnsupportedModelError(why)
        module = build_named(source, pretrained, kwargs)
    else:
        raise PrismaError(f"source must be a name like 'timm:vit_small_patch16_224' or a torch module, "
                          f"got {type(source).__name__}")
    from .adapters import adapter_for

    adapter = adapter_for(module)
    name = source if isinstance(source, str) else type(source).__name__
    _check_device(options.get("device"))
    if backend == "nnsight":
        from .traced.build import wrap

        model = wrap(module, adapter, **options)
        if verify:
            from .verification import verify_traced

            own = getattr(type(model), "_px_verify", None)  # a traced model with its own check (TracedLlava)
            with torch.random.fork_rng(devices=[]):
                if own is not None:
                    own(model, name)
                else:
                    verify_traced(adapter, module, model, name)
        return model
    with torch.random.fork_rng(devices=[]):  # building the hooked model leaves the global RNG alone
        model = adapter.to_hooked(module, **options)
    if verify:
        from .verification import verify_hooked

        verify_hooked(adapter, module, model, name)
    return model


def _check_device(device: Any) -> None:
    """A clear error for a device this machine does not have (before anything moves)."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise PrismaError(f"device={device!r} is not a device torch knows ({err})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise PrismaError(f"device={device!r}: no CUDA device is available here (torch.cuda.is_available() is "
                          "False); load on the CPU (device='cpu') or on a machine with a GPU")
    if kind == "meta":
        raise PrismaError("device='meta' holds no weights: prisma-ext converts and checks real weights; for a "
                          "model without local weights use backend='nnsight' with remote=...")
