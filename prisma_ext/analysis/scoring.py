"""Running a model for a target's score: one forward pass with optional reads, edits and
gradients (`evaluate`), and the images -> score-table function Captum takes (`table_function`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from .backend import Backend, Edit, Run
from .targets import Target


def stash_edits(target: Target, edit: Mapping[str, Edit] | None, stash: dict[str, Tensor]) -> dict[str, Edit]:
    """`edit` plus, for each site the target reads, an edit that keeps its (edited) value."""
    edits = dict(edit or {})
    for site in target.sites:
        inner = edits.get(site)

        def keep(value: Tensor, site: str = site, inner: Edit | None = inner) -> Tensor:
            value = inner(value) if inner is not None else value
            stash[site] = value
            return value

        edits[site] = keep
    return edits


def evaluate(backend: Backend, images: Tensor, target: Target, read: Sequence[str] = (),
             edit: Mapping[str, Edit] | None = None, grad: bool = False
             ) -> tuple[Run, Tensor, Target]:
    """One forward pass: (run, scores [batch], the bound target). With `grad`, `run.grads` holds
    the gradient of the summed scores at each read site."""
    stash: dict[str, Tensor] = {}
    edits = stash_edits(target, edit, stash)
    found: dict[str, Any] = {}

    def metric(output: Tensor) -> Tensor:
        bound = target.bind(backend, output, images.shape[0])
        found["target"], found["scores"] = bound, bound.score(output, stash)
        return found["scores"].sum()

    run = backend.run(images, read=read, edit=edits, grad_of=metric if grad else None)
    if not grad:
        metric(run.output)
    run.acts.update({k: v for k, v in stash.items() if k not in run.acts})
    return run, found["scores"], found["target"]


def table_function(backend: Backend, target: Target, edit: Mapping[str, Edit] | None = None
                   ) -> Callable[[Tensor], Tensor]:
    """images -> the bound target's table [n, K], for Captum (pass `target=columns`)."""

    def forward(images: Tensor) -> Tensor:
        stash: dict[str, Tensor] = {}
        run = backend.run(images, edit=stash_edits(target, edit, stash))
        return target.table(run.output, stash)

    return forward
