"""The simple shapes the small in-test ViT is trained on (tests/support/small_trained.py): the
generator prisma_ext shipped as `prisma_ext.data.make_shapes` before `make_scenes` replaced it.

A seeded procedural data set: one coloured shape per image on a blank canvas, with its mask.

    images, labels, masks = make_shapes(256, seed=0, size=32)
    # images float [n, 3, size, size] in [0, 1], labels long [n], masks bool [n, size, size]

The label is the shape's kind (`SHAPES[label]`); its colour, size and position are random, so a
classifier has to look at the shape's pixels, which `masks` marks: attribution maps can be
checked against them. The same seed gives the same images on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prisma_ext.data.scenes import BASIC_SHAPES as SHAPES
from prisma_ext.data.scenes import shape_mask
from prisma_ext.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor



def make_shapes(n: int, seed: int = 0, size: int = 32, shapes: Sequence[str] = SHAPES,
                scale: tuple[float, float] = (0.15, 0.28), background: float = 0.0,
                noise: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """`n` images of one shape each -> (images float [n, 3, size, size], labels long [n],
    masks bool [n, size, size]).

    `shapes`: the classes (label i is `shapes[i]`); `scale`: the shape's half-size as a
    fraction of `size`; `background`: the canvas value; `noise`: std of Gaussian pixel noise
    added everywhere (0: a blank canvas). Colours are bright (each channel in [0.3, 1]).
    """
    import numpy as np
    import torch

    if n < 0 or size < 8:
        raise InputError(f"make_shapes needs n >= 0 and size >= 8, got n={n}, size={size}")
    shapes = tuple(shapes)
    for kind in shapes:
        if kind not in SHAPES:
            raise InputError(f"unknown shape {kind!r}; expected some of {SHAPES}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(shapes), n)
    radii = rng.uniform(*scale, n) * size
    colours = rng.uniform(0.3, 1.0, (n, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.full((n, 3, size, size), background, dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        r = radii[i]
        cy, cx = rng.uniform(r, size - 1 - r, 2)
        mask = shape_mask(shapes[labels[i]], yy - cy, xx - cx, r)
        masks[i] = mask
        images[i][:, mask] = colours[i][:, None]
    if noise:
        images += rng.normal(0.0, noise, images.shape).astype(np.float32)
    return torch.from_numpy(images), torch.from_numpy(labels).long(), torch.from_numpy(masks)
