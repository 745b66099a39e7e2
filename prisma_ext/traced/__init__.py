"""The nnsight backend: original source modules traced by nnsight, read by TL site names.

`px.load(source, backend="nnsight")` returns a `TracedViT` (timm, Hugging Face ViT) or a
`TracedCLIP` (open_clip, Hugging Face CLIP) built by `build.wrap`; with `remote=` a
`RemoteTracedCLIP` or `RemoteTracedViT`. Where each site lives is the adapters' site maps
(`prisma_ext.sitemaps`). `model` imports nnsight, on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {"TracedModel": "prisma_ext.traced.model", "TracedViT": "prisma_ext.traced.model",
         "TracedCLIP": "prisma_ext.traced.clip", "RemoteTracedCLIP": "prisma_ext.traced.remote",
         "RemoteTracedViT": "prisma_ext.traced.remote", "wrap": "prisma_ext.traced.build"}
__all__ = ["RemoteTracedCLIP", "RemoteTracedViT", "TracedCLIP", "TracedModel", "TracedViT", "wrap"]

if TYPE_CHECKING:  # pragma: no cover
    from .build import wrap
    from .clip import TracedCLIP
    from .model import TracedModel, TracedViT
    from .remote import RemoteTracedCLIP, RemoteTracedViT


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'prisma_ext.traced' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
