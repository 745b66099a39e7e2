"""Errors that name what was expected and what came, with the closest valid names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PrismaError(ValueError):
    """Base class of prisma-ext's user-facing errors."""


class UnsupportedModelError(PrismaError):
    """The source model (or one of its features) has no adapter."""


class UnknownNameError(PrismaError, KeyError):
    """An unknown model or site name; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(PrismaError):
    """Images that the model cannot take (shape, dtype, NaN)."""


class MissingSiteError(PrismaError):
    """A method reads a site the model's site map does not map (the nnsight backend)."""

    def __init__(self, message: str, sites: list[str] | None = None):
        super().__init__(message)
        self.sites = list(sites or [])


class IdentityError(PrismaError):
    """A method's own identity does not hold on this model (the lens's last layer is not the output,
    DLA's parts do not sum to the score, patching everything does not give the clean run): its
    numbers would disagree with the model, so none are returned."""


def identity_tolerance(reference: float) -> float:
    """How far an identity may miss in float32: 1e-4 of the size of what it sums, plus 1e-4."""
    return 1e-4 * (1.0 + abs(reference))


def check_identity(got, want, explain, size: float | None = None) -> None:
    """Raise IdentityError(explain(miss, size)) unless tensors `got` and `want` agree within
    `identity_tolerance(size)` (size: the largest |want| unless given)."""
    size = float(want.detach().abs().max()) if size is None else size
    miss = float((got - want.to(got)).abs().max())
    if miss > identity_tolerance(size):
        raise IdentityError(explain(miss, size))


def closest(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """The `n` names in `choices` most similar to `name`, best first."""
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if len(found) < n:  # fall back on shared substrings for long names
        stem = name.split(":")[-1].split(".")[-1][:8].lower()
        found += [c for c in choices if stem and stem in c.lower() and c not in found][: n - len(found)]
    return found


def suggest(name: str, choices: Iterable[str], what: str) -> str:
    """'unknown <what> 'x'; closest: a, b' as one line."""
    near = closest(name, choices)
    hint = f"; closest: {', '.join(near)}" if near else ""
    return f"unknown {what} {name!r}{hint}"
