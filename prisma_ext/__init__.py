"""prisma-ext: mechanistic interpretability for vision transformers on TransformerLens.

`import prisma_ext as px; model = px.load("timm:vit_small_patch16_224")`. Heavy libraries (torch
extensions, timm, transformer_lens) load on first use, so this import is fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "load": ("prisma_ext.load", "load"),
    "HookedViT": ("prisma_ext.hooked.vit", "HookedViT"),
    "ViTConfig": ("prisma_ext.hooked.config", "ViTConfig"),
    "ViTWeights": ("prisma_ext.hooked.weights", "ViTWeights"),
    "BlockWeights": ("prisma_ext.hooked.weights", "BlockWeights"),
    "TokenLayout": ("prisma_ext.layout", "TokenLayout"),
    "register_adapter": ("prisma_ext.adapters", "register_adapter"),
    "Adapter": ("prisma_ext.adapters", "Adapter"),
    "errors": ("prisma_ext.errors", None),
    "adapters": ("prisma_ext.adapters", None),
    "data": ("prisma_ext.data", None),
    "bridge": ("prisma_ext.bridge", None),
    "activation_patching": ("prisma_ext.analysis.patching", "activation_patching"),
    "attribution_patching": ("prisma_ext.analysis.attribution_patching", "attribution_patching"),
    "image_text_patching": ("prisma_ext.analysis.image_text", "image_text_patching"),
    "metrics": ("prisma_ext.metrics", None),
    "zoo": ("prisma_ext.zoo", None),
    "logit_lens": ("prisma_ext.analysis.lens", "logit_lens"),
    "direct_logit_attribution": ("prisma_ext.analysis.attribution", "direct_logit_attribution"),
    "attention_rollout": ("prisma_ext.analysis.attention", "attention_rollout"),
    "gradient_attention": ("prisma_ext.analysis.attention", "gradient_attention"),
    "captum_attribution": ("prisma_ext.analysis.captum_attr", "captum_attribution"),
    "faithfulness": ("prisma_ext.analysis.faithfulness", "faithfulness"),
    "compare_attributions": ("prisma_ext.analysis.compare", "compare_attributions"),
    "LogitDiff": ("prisma_ext.analysis.targets", "LogitDiff"),
    "ImageTextScore": ("prisma_ext.analysis.targets", "ImageTextScore"),
}

__all__ = ["Adapter", "BlockWeights", "HookedViT", "TokenLayout", "ViTConfig", "ViTWeights", "adapters",
           "bridge", "data", "errors", "load", "register_adapter", "activation_patching",
           "attribution_patching", "image_text_patching", "metrics", "zoo"]
__all__ += ["ImageTextScore", "LogitDiff", "attention_rollout", "captum_attribution", "compare_attributions",
            "direct_logit_attribution", "faithfulness", "gradient_attention", "logit_lens"]

if TYPE_CHECKING:  # pragma: no cover
    from .adapters import Adapter, register_adapter
    from .hooked.config import ViTConfig
    from .hooked.vit import HookedViT
    from .hooked.weights import BlockWeights, ViTWeights
    from .layout import TokenLayout
    from .load import load


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'prisma_ext' has no attribute {name!r}")
    module_path, attr = _LAZY[name]
    module = importlib.import_module(module_path)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
