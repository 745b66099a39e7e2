"""Small helpers the analysis methods share: checking images, layer sites and labels, and running
a method over chunks of a batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, MissingSiteError
from ..layout import TokenLayout
from .backend import Backend
from .progress import Progress
from .result import AnalysisResult
from .targets import Target, bind


def check_batch(images: Tensor, method: str) -> None:
    """Images [batch, channels, height, width] (the model checks size, channels and NaN)."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = f"shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"{method}: expected images [batch, channels, height, width], got {got}")
    if images.shape[0] == 0:
        raise InputError(f"{method}: got an empty batch of images")


def check_batch_size(batch_size: Any, method: str) -> int | None:
    """None (the whole batch at once) or a positive int."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise InputError(f"{method}: batch_size must be a positive int or None, got {batch_size!r}")
    return int(batch_size)


def layout_for(backend: Backend, images: Tensor) -> TokenLayout:
    """The token layout for these images' size."""
    return backend.layout.for_image(*images.shape[-2:])


def resid_sites(n_layers: int) -> list[str]:
    """The residual stream before block 0, then after each block: n_layers + 1 sites."""
    return ["blocks.0.hook_resid_pre", *[f"blocks.{i}.hook_resid_post" for i in range(n_layers)]]


def layer_labels(n_layers: int) -> list[str]:
    """Labels of `resid_sites`: "embed", then "L{i}" (after block i)."""
    return ["embed", *[f"L{i}" for i in range(n_layers)]]


def patches_of(values: Tensor, layout: TokenLayout) -> Tensor:
    """The patch tokens [..., n_patches] of a per-token tensor [..., pos] (prefix dropped)."""
    return values[..., layout.n_prefix: layout.n_prefix + layout.n_patches]


NO_TARGET: Any = object()  # for a method that explains no score


@contextlib.contextmanager
def naming(method: str) -> Iterator[None]:
    """Errors about sites a model does not map name the method that needed them."""
    try:
        yield
    except MissingSiteError as err:
        raise MissingSiteError(f"{method}: {err}", err.sites) from None


def in_chunks(backend: Backend, images: Tensor, target: Any, batch_size: int | None, progress: bool, method: str,
              run: Callable[[Tensor, Target | None], AnalysisResult]) -> AnalysisResult:
    """`run(images, bound target)` over chunks of `batch_size` images (None: all at once), the
    target bound once to the whole batch and each chunk given its rows (`NO_TARGET`: None is
    passed); results joined."""
    check_batch(images, method)
    batch_size = check_batch_size(batch_size, method)
    with naming(method):
        return _in_chunks(backend, images, target, batch_size, progress, method, run)


def _in_chunks(backend: Backend, images: Tensor, target: Any, batch_size: int | None, progress: bool, method: str,
               run: Callable[[Tensor, Target | None], AnalysisResult]) -> AnalysisResult:
    n = images.shape[0]
    size = batch_size or n
    chunks = [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]
    bound = None
    if target is not NO_TARGET:
        output = None
        if len(chunks) > 1:
            with torch.no_grad():
                output = torch.cat([backend.output(images[rows]) for rows in chunks])
        bound = bind(backend, images, target, output)
    if len(chunks) == 1:
        return run(images, bound)
    results = []
    with Progress(n, progress, method, unit="image") as bar:
        for rows in chunks:
            results.append(run(images[rows], bound.select(rows) if bound is not None else None))
            bar.update(len(rows))
    return AnalysisResult.concat(results)
