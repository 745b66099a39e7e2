"""Wrapping a source module for the nnsight backend: the traced class its adapter calls for."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._deprecated import warn


def wrap(module: nn.Module, adapter: Any = None, **options: Any):
    """The original `module` wrapped by nnsight with TL site names (no weight conversion):
    the adapter's `traced_class` (a class, or "module:Class" to import), else a `TracedCLIP` for a
    CLIP adapter, else a `TracedViT`.
    `options`: device, dtype (they move the module itself)."""
    from ..adapters import CLIPAdapter, adapter_for

    adapter = adapter if adapter is not None else adapter_for(module)
    if getattr(type(adapter), "to_traced", None) is not None:  # the contract before traced_class
        warn(f"{type(adapter).__name__}.to_traced", "the adapter attribute traced_class = YourTracedModel")
        return adapter.to_traced(module, **options)
    cls = adapter.traced_class
    if isinstance(cls, str):  # "package.module:Class", imported only for a trace
        import importlib

        path, _, name = cls.partition(":")
        cls = getattr(importlib.import_module(path), name)
    if cls is None:
        if isinstance(adapter, CLIPAdapter):
            from .clip import TracedCLIP as cls
        else:
            from .model import TracedViT as cls
    return cls(module, adapter=adapter, **options)
