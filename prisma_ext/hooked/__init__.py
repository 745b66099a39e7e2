"""The TransformerLens backend: hooked layers, HookedViT, HookedTextTransformer and HookedCLIP.

`config` (architectures), `weights` (the canonical weights adapters hand over), `processing`
(TL's weight processing), `layers` / `embed` / `attention_pool` (hooked building blocks),
`readout` (how a ViT's residual stream becomes its output), `vit`, `text`, `clip` (the models).
Names load on first use: importing `prisma_ext.hooked.config` does not import TransformerLens.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {"HookedViT": "vit", "HookedCLIP": "clip", "HookedTextTransformer": "text", "ViTConfig": "config",
         "TextConfig": "config", "ViTWeights": "weights", "BlockWeights": "weights", "TextWeights": "weights",
         "AttnPoolWeights": "weights", "Readout": "readout"}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .clip import HookedCLIP
    from .config import TextConfig, ViTConfig
    from .readout import Readout
    from .text import HookedTextTransformer
    from .vit import HookedViT
    from .weights import AttnPoolWeights, BlockWeights, TextWeights, ViTWeights


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'prisma_ext.hooked' has no attribute {name!r}")
    return getattr(importlib.import_module(f"prisma_ext.hooked.{_LAZY[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
