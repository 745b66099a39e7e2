"""The adapter registry: `register_adapter` adds one; `adapter_for` finds the one for a module."""

from __future__ import annotations

import importlib

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter

_BUILTIN_MODULES = ("prisma_ext.adapters.timm_vit", "prisma_ext.adapters.timm_eva", "prisma_ext.adapters.open_clip",
                    "prisma_ext.adapters.hf_vit", "prisma_ext.adapters.hf_clip", "prisma_ext.adapters.hf_dino",
                    "prisma_ext.adapters.hf_siglip", "prisma_ext.adapters.hf_clip_variants",
                    "prisma_ext.adapters.hf_aimv2", "prisma_ext.adapters.hf_llava")
_user_adapters: list[Adapter] = []
_builtin_adapters: list[Adapter] = []


def register_adapter(adapter: Adapter | type[Adapter]) -> Adapter | type[Adapter]:
    """Register an adapter (instance or class); user adapters are tried before built-in ones.

    Usable as a class decorator: then the class is returned (so the decorated name stays the
    class); called with an instance, that instance is returned.
    """
    instance = adapter() if isinstance(adapter, type) else adapter
    if not isinstance(instance, Adapter):
        kind = type(instance).__name__
        raise TypeError(f"an adapter must subclass prisma_ext.adapters.Adapter, got {kind}")
    _user_adapters[:] = [a for a in _user_adapters if a.name != instance.name]
    _user_adapters.insert(0, instance)
    return instance if not isinstance(adapter, type) else adapter


def unregister_adapter(name: str) -> None:
    _user_adapters[:] = [a for a in _user_adapters if a.name != name]


def builtin_adapters() -> list[Adapter]:
    """The built-in adapters (importing their modules)."""
    return list(_builtins())


def _builtins() -> list[Adapter]:
    if not _builtin_adapters:
        for path in _BUILTIN_MODULES:
            _builtin_adapters.extend(importlib.import_module(path).ADAPTERS)
    return _builtin_adapters


def list_adapters() -> list[str]:
    return [a.name for a in _user_adapters + _builtins()]


def adapter_for(module: nn.Module) -> Adapter:
    """The first registered adapter that matches `module`, or UnsupportedModelError."""
    for adapter in _user_adapters + _builtins():
        if adapter.matches(module):
            return adapter
    for adapter in _builtins():
        reason = adapter.refusal(module)
        if reason:
            raise UnsupportedModelError(reason)
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    raise UnsupportedModelError(
        f"no adapter recognises {kind}; registered adapters: {', '.join(list_adapters())}. "
        "Write one with prisma_ext.adapters.register_adapter (see docs/adapters.md)")
