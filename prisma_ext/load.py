"""`px.load`: one entry point from a source (name or module) to a hooked model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import PrismaError, UnknownNameError, UnsupportedModelError, suggest

BACKENDS = ("tl", "nnsight")
SOURCE_PREFIXES = ("timm", "open_clip", "hf", "builtin")
HOOKED_OPTIONS = ("fold_ln", "center_writing_weights", "fold_value_biases", "use_attn_result",
                  "device", "dtype")


def load(source: str | nn.Module, backend: str = "tl", pretrained: bool | str | os.PathLike = True,
         remote: bool | str = False, **kwargs: Any):
    """Load a ViT or CLIP model as a hooked model (HookedViT or HookedCLIP).

    `source`: "timm:NAME" (any timm VisionTransformer config, e.g. "timm:vit_small_patch16_224",
    tags allowed: "timm:vit_small_patch16_224.augreg_in21k_ft_in1k"), "open_clip:ARCH" or
    "open_clip:ARCH/TAG" (e.g. "open_clip:ViT-B-32/openai"), "hf:REPO_OR_DIR" (a Hugging Face
    CLIPModel, CLIPVisionModel, ViTForImageClassification or ViTModel), or a module instance of
    any of these (or one a registered adapter recognises).
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
        module = _build_named(source, pretrained, kwargs)
    else:
        raise PrismaError(f"source must be a name like 'timm:vit_small_patch16_224' or a torch module, "
                          f"got {type(source).__name__}")
    from .adapters import adapter_for

    adapter = adapter_for(module)
    if backend == "nnsight":
        return adapter.to_traced(module, **options)
    return adapter.to_hooked(module, **options)


def _build_named(source: str, pretrained, kwargs: dict) -> nn.Module:
    prefix, sep, name = source.partition(":")
    if not sep or not name:
        raise UnknownNameError(f"source {source!r} needs a prefix: one of "
                               f"{', '.join(p + ':NAME' for p in SOURCE_PREFIXES)}")
    if prefix not in SOURCE_PREFIXES:
        raise UnknownNameError(suggest(prefix, SOURCE_PREFIXES, "source prefix"))
    build = {"timm": _build_timm, "open_clip": _build_open_clip, "hf": _build_hf, "builtin": _build_builtin}[prefix]
    return build(name, pretrained, kwargs)


def supported_timm_names() -> list[str]:
    """timm model names built by the classes the timm adapter converts (timm's vision_transformer
    and deit modules); a config there that uses a refused feature (qk_norm, SwiGLU ...) is still
    refused, with the feature named, when it is loaded."""
    import timm

    return timm.list_models(module=["vision_transformer", "deit"])


def _build_timm(name: str, pretrained, kwargs: dict) -> nn.Module:
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise UnknownNameError(suggest(arch, supported_timm_names(), "timm model") +
                               "; timm.list_models() lists every name")
    if _is_path(pretrained):
        path = Path(pretrained)
        if not path.is_file():
            raise PrismaError(f"pretrained checkpoint {str(path)!r} does not exist")
        overlay = dict(file=str(path))
        if "num_classes" in kwargs:  # else timm drops a head whose size differs from its default
            overlay["num_classes"] = kwargs["num_classes"]
        kwargs = dict(kwargs, pretrained_cfg_overlay=overlay)
        pretrained = True
    try:
        module = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if pretrained and not kwargs.get("pretrained_cfg_overlay"):
            raise PrismaError(
                f"could not fetch pretrained weights for timm:{name} ({type(err).__name__}: {err}). "
                "Offline? Pass pretrained=False for random weights or pretrained='path/to/checkpoint'"
            ) from err
        raise PrismaError(f"timm could not build {name}: {err}") from err
    module.eval()
    from .adapters.timm_vit import TimmViTAdapter

    adapter = TimmViTAdapter()
    if not adapter.matches(module):
        reason = adapter.refusal(module) or f"{type(module).__name__} is not a ViT"
        near = suggest_names(name) or ["vit_small_patch16_224", "deit_small_distilled_patch16_224",
                                       "vit_small_patch14_reg4_dinov2", "vit_base_patch16_siglip_224"]
        raise UnsupportedModelError(f"timm:{name}: {reason}; closest supported names: {', '.join(near)}")
    return module


def suggest_names(name: str) -> list[str]:
    from .errors import closest

    return closest(name, supported_timm_names())


def _is_path(value) -> bool:
    return isinstance(value, (str, os.PathLike)) and not isinstance(value, bool)


def _build_open_clip(name: str, pretrained, kwargs: dict) -> nn.Module:
    import open_clip

    arch, _, tag = name.partition("/")
    if arch not in open_clip.list_models():
        raise UnknownNameError(suggest(arch, open_clip.list_models(), "open_clip model") +
                               "; open_clip.list_models() lists every name")
    if _is_path(pretrained):
        if not Path(pretrained).is_file():
            raise PrismaError(f"pretrained checkpoint {str(pretrained)!r} does not exist")
        weights = str(pretrained)
    elif pretrained:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag and tag not in tags:
            raise UnknownNameError(suggest(tag, tags, f"pretrained tag of {arch}"))
        if not tag and not tags:
            raise PrismaError(f"open_clip:{arch} has no published weights; pass pretrained=False")
        weights = tag or tags[0]
    else:
        weights = None
    try:
        module = open_clip.create_model(arch, pretrained=weights, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if weights and not _is_path(pretrained):
            raise PrismaError(
                f"could not fetch pretrained weights {weights!r} for open_clip:{arch} ({type(err).__name__}: "
                f"{err}). Offline? Pass pretrained=False or pretrained='path/to/checkpoint'") from err
        raise PrismaError(f"open_clip could not build {name}: {err}") from err
    module.eval()
    module._prisma_arch = arch
    module._prisma_source = f"open_clip:{arch}" + (f"/{weights}" if weights and not _is_path(pretrained) else "")
    return module


def _build_hf(name: str, pretrained, kwargs: dict) -> nn.Module:
    from transformers import AutoConfig, CLIPModel, CLIPVisionModel, ViTForImageClassification, ViTModel

    source = str(pretrained) if _is_path(pretrained) else name
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise PrismaError(f"could not read the config of hf:{source} ({type(err).__name__}: {err}). "
                          "Offline? Save the model with save_pretrained and pass its folder") from err
    vit_model = "ViTModel" in (getattr(config, "architectures", None) or [])
    classes = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModel,
               "vit": ViTModel if vit_model else ViTForImageClassification}
    if config.model_type == "vit" and vit_model:
        kwargs = dict(kwargs, add_pooling_layer=False)  # its pooler (dense + tanh) has no HookedViT part
    if config.model_type not in classes:
        raise UnsupportedModelError(f"hf:{name}: model type {config.model_type!r} is not supported; "
                                    f"supported: {', '.join(classes)}")
    cls = classes[config.model_type]
    try:
        module = cls.from_pretrained(source, **kwargs) if pretrained else cls(config)
    except (OSError, ValueError) as err:
        raise PrismaError(f"could not load the weights of hf:{source} ({type(err).__name__}: {err})") from err
    module.eval()
    module._prisma_source = f"hf:{name}"
    return module


def _build_builtin(name: str, pretrained, kwargs: dict) -> nn.Module:
    """A model of `prisma_ext.zoo` ("shapes-vit", "shapes-clip"): shipped weights, offline."""
    from .zoo import build

    if kwargs:
        raise PrismaError(f"builtin:{name} takes no constructor arguments, got {sorted(kwargs)}")
    return build(name, pretrained)
