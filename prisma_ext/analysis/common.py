"""Small helpers the analysis methods share: checking images, layer sites and labels."""

from __future__ import annotations

from torch import Tensor

from ..errors import InputError
from ..layout import TokenLayout
from .backend import Backend


def check_batch(images: Tensor, method: str) -> None:
    """Images [batch, channels, height, width] (the model checks size, channels and NaN)."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = f"shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"{method}: expected images [batch, channels, height, width], got {got}")
    if images.shape[0] == 0:
        raise InputError(f"{method}: got an empty batch of images")


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
