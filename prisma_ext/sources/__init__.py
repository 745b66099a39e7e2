"""Sources: where a named model comes from. `px.load("PREFIX:NAME")` asks the source registered
under PREFIX to build the module; an adapter then converts or traces it.

    timm:NAME[.TAG]        timm.create_model            (sources/timm.py)
    open_clip:ARCH[/TAG]   open_clip.create_model       (sources/open_clip.py)
    hf:REPO_OR_FOLDER      transformers from_pretrained (sources/hf.py)
    builtin:NAME           the models shipped in prisma_ext.zoo (sources/builtin.py)

A new library is a `Source` subclass registered with `register_source`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from torch import nn

from ..errors import UnknownNameError, suggest

_BUILTIN = {"timm": "prisma_ext.sources.timm", "open_clip": "prisma_ext.sources.open_clip",
            "hf": "prisma_ext.sources.hf", "builtin": "prisma_ext.sources.builtin"}
_registered: dict[str, Source] = {}


class Source:
    """A library that builds models by name. `prefix` is what `px.load` names it by."""

    prefix: str = ""

    def build(self, name: str, pretrained: bool | str | os.PathLike, kwargs: dict[str, Any]) -> nn.Module:
        """The module `name` names (in eval mode): `pretrained` True for published weights, False
        for random ones, or a local checkpoint path; `kwargs` go to the library's constructor."""
        raise NotImplementedError

    def closest_supported(self, name: str, n: int = 3) -> list[str]:
        """Up to `n` names of this source, closest to `name`, that the adapters take (said when
        `name` is refused); by default none."""
        return []


def closest_supported(source: str, n: int = 3) -> list[str]:
    """`Source.closest_supported` of a "PREFIX:NAME" string (none for an unknown prefix)."""
    prefix, _, name = source.partition(":")
    try:
        return source_for(prefix).closest_supported(name.split("/")[0], n)
    except UnknownNameError:
        return []


def accepted(build: Any, candidates: list[str], n: int) -> list[str]:
    """The first `n` candidate names whose module `build(name)` (on the meta device: no weights)
    an adapter converts; a build that fails counts as refused."""
    import torch

    from ..adapters import adapter_for

    out = []
    for name in candidates:
        try:
            with torch.device("meta"):
                module = build(name)
            adapter_for(module).check(module)
        except Exception:  # refused (a PrismaError), or not buildable here
            continue
        out.append(name)
        if len(out) == n:
            break
    return out


def register_source(source: Source | type[Source]) -> Source:
    """Register a source (an instance or a class) under its `prefix`, replacing any there."""
    instance = source() if isinstance(source, type) else source
    if not isinstance(instance, Source) or not instance.prefix:
        raise TypeError("a source must subclass prisma_ext.sources.Source and set `prefix`")
    _registered[instance.prefix] = instance
    return instance


def prefixes() -> list[str]:
    return sorted({*_BUILTIN, *_registered})


def source_for(prefix: str) -> Source:
    """The source registered under `prefix` (built-in ones load on first use)."""
    if prefix not in _registered and prefix in _BUILTIN:
        register_source(importlib.import_module(_BUILTIN[prefix]).SOURCE)
    if prefix not in _registered:
        raise UnknownNameError(suggest(prefix, prefixes(), "source prefix"))
    return _registered[prefix]


def build_named(source: str, pretrained: Any, kwargs: dict[str, Any]) -> nn.Module:
    """The module of a "PREFIX:NAME" source string."""
    prefix, sep, name = source.partition(":")
    if not sep or not name:
        raise UnknownNameError(f"source {source!r} needs a prefix: one of "
                               f"{', '.join(p + ':NAME' for p in prefixes())}")
    return source_for(prefix).build(name, pretrained, kwargs)


def is_path(value: Any) -> bool:
    """Whether `pretrained` names a local file (a str or path, not a bool)."""
    return isinstance(value, (str, os.PathLike)) and not isinstance(value, bool)


__all__ = ["Source", "build_named", "closest_supported", "is_path", "prefixes", "register_source", "source_for"]
