"""Source modules from a zoo config: a timm VisionTransformer or an open_clip CLIP.

A zoo config is a JSON-able dict: `{"library": "timm", "timm_name": ..., "timm_tag": ...,
"kwargs": {...}}` (arguments of `timm.create_model`) or `{"library": "open_clip", "model_cfg":
{...}}` (arguments of open_clip's `CLIP`), plus `class_names`, `mean`, `std` and `img_size`.
The training script and `px.load("builtin:...")` build through the same functions, so the
shipped JSON is the single description of each model.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..errors import PrismaError


def build_timm(info: dict[str, Any]) -> nn.Module:
    """A randomly initialised timm model, with mean/std/label names in its `pretrained_cfg`."""
    import timm

    overlay = dict(tag=info.get("timm_tag"), mean=tuple(info["mean"]), std=tuple(info["std"]),
                   crop_pct=1.0, input_size=(3, info["img_size"], info["img_size"]),
                   num_classes=len(info["class_names"]), label_names=tuple(info["class_names"]))
    return timm.create_model(info["timm_name"], pretrained=False, pretrained_cfg_overlay=overlay,
                             **info["kwargs"])


def build_open_clip(info: dict[str, Any]) -> nn.Module:
    """A randomly initialised open_clip `CLIP` from `info["model_cfg"]`, with its preprocess cfg."""
    from open_clip import CLIP
    from open_clip.model import set_model_preprocess_cfg

    model = CLIP(**info["model_cfg"])
    set_model_preprocess_cfg(model, dict(size=info["img_size"], mean=tuple(info["mean"]),
                                         std=tuple(info["std"]), interpolation="bicubic",
                                         resize_mode="shortest"))
    return model


def build_module(info: dict[str, Any]) -> nn.Module:
    """The source module a zoo config describes (random weights, eval mode)."""
    library = info.get("library")
    builders = {"timm": build_timm, "open_clip": build_open_clip}
    if library not in builders:
        raise PrismaError(f"zoo config names library {library!r}; expected one of {', '.join(builders)}")
    return builders[library](info).eval()


def load_weights(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a safetensors state dict (any float dtype; cast to the module's) into `module`."""
    from safetensors.torch import load_file

    state = load_file(os.fspath(path))
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise PrismaError(f"checkpoint {os.fspath(path)!r} does not fit the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return module


def save_weights(module: nn.Module, path: str | os.PathLike, dtype: Any = None) -> None:
    """Save `module`'s state dict as safetensors (floats cast to `dtype` when given)."""
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in module.state_dict().items()}
    save_file(state, os.fspath(path))
    os.chmod(path, 0o644)  # safetensors writes 0600; installed package data must be world-readable
