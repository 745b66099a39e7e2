"""Patch embedding, prefix tokens and position embeddings (interpolated for other sizes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ViTConfig
from .norms import NormSpec, make_norm


def resample_grid(pos: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """Bicubic, antialiased resize of per-patch position rows [old_h*old_w, d] to a new grid."""
    if old == new:
        return pos
    d = pos.shape[-1]
    grid = pos.float().reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(new[0] * new[1], d).to(pos.dtype)


class Embedding(nn.Module):
    """Turns images into (patch tokens [B, G, d], prefix tokens [P, d], positions [T, d]).

    Parameters: `proj` (the patch convolution), `prefix` [P, d] (cls, dist, registers in that
    order), `pos_embed` [n_pos, d] (prefix rows first when `cfg.pos_embed_on_prefix`). A rotary
    model also holds its angle tables for its own grid, `rotary_sin`/`rotary_cos` [tables,
    n_patches, heads, d_head] (buffers), and optionally `rotary_source` for other grids.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Conv2d(cfg.in_chans, cfg.d_model, cfg.patch_size, stride=cfg.patch_size)
        self.norm = make_norm(NormSpec(cfg.norm_type, cfg.eps_pre), cfg.d_model) if cfg.patch_norm else None
        self.prefix = nn.Parameter(torch.zeros(cfg.n_prefix, cfg.d_model)) if cfg.n_prefix else None
        grid = cfg.pos_embed_grid or cfg.layout.grid
        n_pos = grid[0] * grid[1] + (cfg.n_prefix if cfg.pos_embed_on_prefix else 0)
        self.pos_embed = nn.Parameter(torch.zeros(n_pos, cfg.d_model)) if cfg.has_pos_embed else None
        self.rotary_source: nn.Module | None = None
        if cfg.rotary != "none":
            shape = (cfg.rotary_tables, cfg.layout.n_patches, cfg.rotary_heads, cfg.d_head)
            self.register_buffer("rotary_sin", torch.zeros(shape))
            self.register_buffer("rotary_cos", torch.zeros(shape))

    def rotary(self, grid: tuple[int, int]) -> tuple[Tensor, Tensor] | None:
        """The rotary tables (sin, cos) [tables, gh*gw, heads, d_head] for a patch grid; None for a
        model without rotary embeddings."""
        if self.cfg.rotary == "none":
            return None
        if tuple(grid) == tuple(self.cfg.layout.grid):
            return self.rotary_sin, self.rotary_cos
        if self.rotary_source is None:
            from ..errors import PrismaError

            raise PrismaError(f"this rotary model has angle tables for its {self.cfg.layout.grid} patch grid only, "
                              f"not for {tuple(grid)}: give images of {self.cfg.img_size} pixels")
        sin, cos = self.rotary_source(tuple(grid))
        return sin.to(self.rotary_sin.dtype), cos.to(self.rotary_cos.dtype)

    def positions(self, grid: tuple[int, int]) -> Tensor | None:
        """Position rows [n_prefix + gh*gw, d] for a grid; zero rows where a token gets none."""
        if self.pos_embed is None:
            return None
        cfg, pos = self.cfg, self.pos_embed
        n_pre = cfg.n_prefix if cfg.pos_embed_on_prefix else 0
        old = cfg.pos_embed_grid or cfg.layout.grid
        if grid == old and n_pre == cfg.n_prefix:
            return pos
        patches = resample_grid(pos[n_pre:], old, grid)
        prefix = pos[:n_pre] if n_pre else pos.new_zeros(cfg.n_prefix, pos.shape[-1])
        return torch.cat([prefix, patches])

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x = self.proj(images)
        grid = (x.shape[-2], x.shape[-1])
        tokens = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            tokens = self.norm(tokens)
        return tokens, self.prefix, self.positions(grid)
