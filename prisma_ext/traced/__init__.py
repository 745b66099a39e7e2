"""The nnsight backend: original source modules traced by nnsight, read by TL site names.

`px.load(source, backend="nnsight")` returns a `TracedViT`. `sites` (site specs that adapters
build) imports nothing heavy; `model` imports nnsight, on first use of `TracedViT`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {"TracedModel": "prisma_ext.traced.model", "TracedViT": "prisma_ext.traced.model"}
__all__ = ["TracedModel", "TracedViT"]

if TYPE_CHECKING:  # pragma: no cover
    from .model import TracedModel, TracedViT


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'prisma_ext.traced' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
