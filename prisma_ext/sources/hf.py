"""`hf:REPO_OR_FOLDER`: a Hugging Face checkpoint, by repo id or `save_pretrained` folder."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import PrismaError, UnsupportedModelError
from . import Source, is_path
from .hub import failure_reason, offline_if_unreachable

POOLED_CLASSES = ("ViTModel", "DeiTModel")  # built with or without a pooler (add_pooling_layer)


def _has_pooler(source: str) -> bool:
    """Whether a saved folder's checkpoint has pooler weights (a repo id: the class default, with)."""
    import json

    folder = Path(source)
    if not folder.is_dir():
        return True
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return any(".pooler." in f".{k}" for k in json.loads(index.read_text())["weight_map"])
    keys: list[str] = []
    for file in folder.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(file), "pt") as handle:
            keys += list(handle.keys())
    if not keys:
        import torch

        for file in folder.glob("*.bin"):
            keys += list(torch.load(file, map_location="meta", weights_only=True))
    return any(".pooler." in f".{k}" for k in keys)


class HFSource(Source):
    prefix = "hf"

    def build(self, name, pretrained, kwargs) -> nn.Module:
        from ..adapters.registry import builtin_adapters

        builtin_adapters()  # every HF adapter registers its classes
        source = str(pretrained) if is_path(pretrained) else name
        from_hub = not is_path(pretrained) and not Path(name).is_dir()
        with offline_if_unreachable(from_hub) as unreachable:
            return self._build(name, source, pretrained, kwargs, unreachable)

    def _build(self, name, source, pretrained, kwargs, unreachable: bool) -> nn.Module:
        import transformers
        from transformers import AutoConfig

        from ..adapters.hf_common import DEFAULT_CLASSES, class_for

        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as err:
            why = failure_reason(err, unreachable, "its config")
            raise PrismaError(f"could not read the config of hf:{source} ({why}). "
                              "Offline? Save the model with save_pretrained and pass its folder") from err
        kind = class_for(config)
        if kind is None:
            raise UnsupportedModelError(f"hf:{name}: model type {config.model_type!r} is not supported; "
                                        f"supported: {', '.join(sorted(DEFAULT_CLASSES))}")
        cls = getattr(transformers, kind, None)
        if cls is None:
            raise UnsupportedModelError(f"hf:{name}: transformers has no class {kind!r} (its config's architectures)")
        if kind in POOLED_CLASSES and "add_pooling_layer" not in kwargs and pretrained:
            kwargs = dict(kwargs, add_pooling_layer=_has_pooler(source))  # build what the checkpoint holds
        try:
            module = cls.from_pretrained(source, **kwargs) if pretrained else cls(config, **kwargs)
        except (OSError, ValueError) as err:
            why = failure_reason(err, unreachable, "its weights")
            raise PrismaError(f"could not load the weights of hf:{source} ({why}). Offline? Save the model with "
                              "save_pretrained and pass its folder") from err
        module.eval()
        module._prisma_source = f"hf:{name}"
        return module


SOURCE = HFSource()


# model types the TL backend refuses (they trace only): type -> (class, module with its TL_REFUSAL)
TRACED_ONLY = {"llava": ("LlavaForConditionalGeneration", "prisma_ext.adapters.hf_llava")}


def tl_refusal(name: str, pretrained: object) -> str | None:
    """Why the TL backend refuses `hf:name`, read from its config alone (before any weights
    load), or None: not a model type that only traces, or a config unreadable here (then the
    build says why)."""
    import importlib

    source = str(pretrained) if is_path(pretrained) else name
    try:
        from transformers import AutoConfig

        with offline_if_unreachable(not is_path(pretrained) and not Path(name).is_dir()):
            model_type = AutoConfig.from_pretrained(source).model_type
    except Exception:  # unreadable here: the build reports it
        return None
    if model_type not in TRACED_ONLY:
        return None
    kind, module = TRACED_ONLY[model_type]
    return importlib.import_module(module).TL_REFUSAL.format(kind=f"{kind} (hf:{name})")
