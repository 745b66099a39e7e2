"""Rotary position embeddings on the patch tokens (EVA-02, DINOv3, timm's `vit_*_rope_*`).

A rotary model rotates each head's queries and keys by angles that depend on the patch's
position; prefix tokens (class, registers) are not rotated. The angles come as tables
`sin`, `cos` [tables, n_patches, heads, d_head] (`tables` is 1, or one per layer for timm's
"mixed" RoPE with learned frequencies; `heads` is 1, or one per head), so every RoPE variant is
the same rotation here: `x * cos + rotate(x) * sin`, with `rotate` in one of two layouts
("interleaved": pairs (x0, x1), (x2, x3), ...; "half": pairs (x_i, x_{i + d/2})).

The tables for the model's own grid are buffers of the embedding (`embed.rotary_sin/cos`); for
other grids (dynamic image sizes) a table source the adapter supplies makes them
(`RotaryWeights.source`: a module, grid -> (sin, cos)), since the angle schemes differ by family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

RotaryLayout = Literal["none", "interleaved", "half"]


@dataclass
class RotaryWeights:
    """A rotary model's angle tables for its own grid, and (optionally) what makes other grids'."""

    sin: Tensor  # [tables, n_patches, heads, d_head]
    cos: Tensor
    source: nn.Module | None = None  # grid (h, w) -> (sin, cos) as above; None: the model's grid only


def rotate_pairs(x: Tensor, layout: str) -> Tensor:
    """The quarter-turn of each rotated pair: interleaved [x0, x1, ...] -> [-x1, x0, ...]; half
    [a, b] -> [-b, a]."""
    if layout == "interleaved":
        return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: Tensor, sin: Tensor, cos: Tensor, n_prefix: int, layout: str) -> Tensor:
    """Rotate the patch tokens of x [batch, pos, head, d_head] by one layer's tables sin/cos
    [n_patches, heads or 1, d_head]; the first `n_prefix` tokens pass unchanged."""
    patches = x[:, n_prefix:]
    if patches.shape[1] != sin.shape[0]:
        from ..errors import PrismaError

        raise PrismaError(f"rotary tables are for {sin.shape[0]} patches, the input has {patches.shape[1]}")
    rotated = (patches * cos + rotate_pairs(patches, layout) * sin).to(x.dtype)
    return torch.cat([x[:, :n_prefix], rotated], dim=1) if n_prefix else rotated
