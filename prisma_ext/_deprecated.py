"""Old import paths kept for one release: a module that moved forwards its names with a warning.

    # prisma_ext/traced/sites.py, now prisma_ext/sitemaps/spec.py
    from .._deprecated import moved
    __getattr__ = moved(__name__, "prisma_ext.sitemaps.spec")
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def warn(old: str, new: str, stacklevel: int = 3) -> None:
    """A DeprecationWarning saying that `old` is now `new`."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}",
                  DeprecationWarning, stacklevel=stacklevel)


def moved(old_module: str, new_module: str, renames: dict[str, str] | None = None) -> Callable[[str], Any]:
    """A module `__getattr__` for `old_module`: each name is read from `new_module` (under its new
    name where `renames` maps it), with a DeprecationWarning naming the new place."""
    renames = renames or {}

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        new_name = renames.get(name, name)
        value = getattr(importlib.import_module(new_module), new_name)
        warn(f"{old_module}.{name}", f"{new_module}.{new_name}")
        return value

    return __getattr__
