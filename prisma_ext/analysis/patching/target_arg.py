"""The patching methods' `target=` and its old name `metric=` (kept for one release)."""

from __future__ import annotations

from typing import Any

from ..._deprecated import warn
from ...errors import InputError

METRIC_UNSET: Any = object()


def patching_target(target: Any, metric: Any) -> Any:
    """`target`, or `metric` (with a DeprecationWarning) when only the old name is given."""
    if metric is METRIC_UNSET:
        return target
    if target is not None:
        raise InputError("give the patching target once: target=... (metric= is its old name)")
    warn("the metric= argument of the patching methods", "target= (it takes the same values)", stacklevel=4)
    return metric
