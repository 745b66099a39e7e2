"""The nnsight backend: original source modules traced by nnsight, read by TL site names.

`px.load(source, backend="nnsight")` returns a `TracedViT` (timm) or a `TracedCLIP` (open_clip,
Hugging Face CLIP); with `remote=` a `RemoteTracedCLIP` or `RemoteTracedViT`. `sites` and `clip_sites` (site specs
that adapters build) import nothing heavy; `model` imports nnsight, on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {"TracedModel": "prisma_ext.traced.model", "TracedViT": "prisma_ext.traced.model",
         "TracedCLIP": "prisma_ext.traced.clip", "RemoteTracedCLIP": "prisma_ext.traced.remote",
         "RemoteTracedViT": "prisma_ext.traced.remote"}
__all__ = ["RemoteTracedCLIP", "RemoteTracedViT", "TracedCLIP", "TracedModel", "TracedViT"]

if TYPE_CHECKING:  # pragma: no cover
    from .clip import TracedCLIP
    from .model import TracedModel, TracedViT
    from .remote import RemoteTracedCLIP, RemoteTracedViT


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'prisma_ext.traced' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
