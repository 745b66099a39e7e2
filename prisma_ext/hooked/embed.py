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
    order), `pos_embed` [n_pos, d] (prefix rows first when `cfg.pos_embed_on_prefix`).
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
