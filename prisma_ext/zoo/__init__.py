"""Small models trained on `prisma_ext.data.scenes`, shipped in the package.

    model = px.load("builtin:shapes-vit")     # HookedViT, class_names = the six shapes
    clip = px.load("builtin:shapes-clip")     # HookedCLIP; prompts like "a red circle"

Each model is `NAME.safetensors` (weights) plus `NAME.json` (how to build it, class names,
mean/std, image size, training seed and settings, measured accuracies) in this folder.
`python -m prisma_ext.zoo.train` retrains both (see docs/zoo.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PrismaError, UnknownNameError, closest

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn

    from ..data.scenes import Scenes

ZOO_DIR = Path(__file__).resolve().parent
MODELS: tuple[str, ...] = ("shapes-vit", "shapes-clip")


def _check(name: str) -> str:
    if name not in MODELS:
        near = closest(name, MODELS) or list(MODELS)
        raise UnknownNameError(f"unknown builtin model {name!r}; closest: {', '.join(near)}")
    return name


def info(name: str, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The JSON that describes model `name` (from `folder`, default: the shipped one)."""
    path = Path(folder or ZOO_DIR) / f"{_check(name)}.json"
    if not path.is_file():
        raise PrismaError(f"zoo config {str(path)!r} is missing; run `python -m prisma_ext.zoo.train`")
    return json.loads(path.read_text())


def weights_path(name: str) -> Path:
    """The shipped safetensors file of model `name`."""
    return ZOO_DIR / f"{_check(name)}.safetensors"


def build(name: str, pretrained: bool | str | os.PathLike = True) -> nn.Module:
    """The source module of model `name` (timm or open_clip), in eval mode.

    `pretrained`: True for the shipped weights, False for random ones (same architecture), or
    the path of a safetensors file written by the training script.
    """
    from .factory import build_module, load_weights

    if isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool):
        path = Path(pretrained)
        if not path.is_file():
            raise PrismaError(f"pretrained checkpoint {str(path)!r} does not exist")
        model_info = info(name, path.parent) if (path.parent / f"{name}.json").is_file() else info(name)
    else:
        path = weights_path(name) if pretrained else None
        model_info = info(name)
    module = build_module(model_info)
    if path is not None:
        load_weights(module, path)
    module._prisma_source = f"builtin:{name}"  # open_clip's adapter reads it for cfg.source
    return module.eval()


def normalize(images: Tensor, name: str) -> Tensor:
    """Images in [0, 1] [n, 3, H, W] (as `make_scenes` gives them) -> model input of `name`."""
    import torch

    cfg = info(name)
    mean = torch.tensor(cfg["mean"], dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(cfg["std"], dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean) / std


def heldout(name: str, n: int = 1000, seed: int | None = None) -> Scenes:
    """Fresh scenes like those model `name` was trained on (default seed: the one its reported
    held-out accuracy used; training batches use other seeds)."""
    from ..data.scenes import make_scenes

    cfg = info(name)
    return make_scenes(n, seed=cfg["heldout"]["seed"] if seed is None else seed, **cfg["data"])


def zero_shot_templates(name: str = "shapes-clip") -> list[str]:
    """The prompt templates the CLIP model's zero-shot accuracy was measured with."""
    return list(info(name)["zero_shot"]["templates"])


def use_zero_shot_head(model: Any, name: str = "shapes-clip", combined: bool = False) -> Tensor:
    """Give a loaded HookedCLIP the shape classes (or, `combined`, "red circle" ... classes) as
    the vision tower's unembedding, so `model.visual(images)` gives class logits."""
    cfg = info(name)
    classes = cfg["zero_shot"]["combined_classes"] if combined else cfg["class_names"]
    return model.use_zero_shot_head(classes, cfg["zero_shot"]["templates"])


__all__ = ["MODELS", "ZOO_DIR", "build", "heldout", "info", "normalize", "use_zero_shot_head",
           "weights_path", "zero_shot_templates"]
