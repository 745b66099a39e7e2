"""The patching sweep's plan: which sites, layers, position groups and heads become runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PrismaError, suggest

SITES = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "z": "blocks.{}.attn.hook_z",
}
HEAD_SITES = {"z"}


def site_name(site: str, layer: int) -> str:
    return SITES[site].format(layer)


def check_sites(sites) -> list[str]:
    sites = [sites] if isinstance(sites, str) else list(sites)
    if not sites:
        raise PrismaError("no sites given")
    for site in sites:
        if site not in SITES:
            raise PrismaError(suggest(site, SITES, "patching site") + f"; sites: {', '.join(SITES)}")
    return sites


def resolve_indices(values, n: int, what: str) -> list[int]:
    """`values` None or "all" (every index), one int, or ints, each checked to lie in [0, n)."""
    if values is None or values == "all":
        return list(range(n))
    out = [int(v) for v in ([values] if isinstance(values, int) else values)]
    bad = [v for v in out if not 0 <= v < n]
    if bad:
        raise PrismaError(f"{what} must lie in [0, {n}), got {bad}")
    return out


@dataclass
class Jobs:
    """Every patched run for one (site, layer): example index, group index, head index (-1: all)."""

    examples: Tensor
    groups: Tensor
    heads: Tensor

    def __len__(self) -> int:
        return self.examples.shape[0]

    def chunks(self, size: int):
        for start in range(0, len(self), size):
            sl = slice(start, start + size)
            yield Jobs(self.examples[sl], self.groups[sl], self.heads[sl])


def make_jobs(n_examples: int, n_groups: int, heads: list[int] | None) -> Jobs:
    head_list = heads if heads is not None else [-1]
    grid = torch.cartesian_prod(torch.arange(n_examples), torch.arange(n_groups), torch.tensor(head_list))
    grid = grid.reshape(-1, 3)
    return Jobs(grid[:, 0], grid[:, 1], grid[:, 2])


# Activation budget of one chunk of patched runs. On a CPU, chunks that stay near the caches run
# fastest per run (vit_small: ~18 runs a chunk beat 64-180 by 1.2-1.7x); a GPU wants big chunks.
CPU_BUDGET_BYTES, GPU_BUDGET_BYTES = 1e8, 2e9


def default_batch_size(n_tokens: int, d_model: int, d_mlp: int, n_heads: int, device: torch.device | str = "cpu",
                       budget_bytes: float | None = None) -> int:
    """How many patched runs to batch so one chunk's activations stay near `budget_bytes`
    (default: 100 MB on a CPU, 2 GB on a GPU)."""
    if budget_bytes is None:
        budget_bytes = CPU_BUDGET_BYTES if torch.device(device).type == "cpu" else GPU_BUDGET_BYTES
    per_run = 4 * n_tokens * (3 * max(d_mlp, 3 * d_model) + 2 * n_heads * n_tokens)
    return int(max(1, min(512, budget_bytes // per_run)))


@dataclass
class Plan:
    """A resolved patching request: what runs where, for either patching method."""

    backend: object
    sites: list[str]
    layers: list[int]
    heads: list[int]
    groups: object
    base_input: Tensor
    source_input: Tensor


def make_plan(model, clean: Tensor, corrupted: Tensor, sites, positions, heads, layers, direction: str) -> Plan:
    """Check the inputs and resolve sites, layers, heads and positions against the model."""
    from .backend import Backend
    from .patching import check_pair
    from .positions import resolve_positions

    be = Backend.of(model)
    check_pair(clean, corrupted)
    if direction not in ("denoising", "noising"):
        raise PrismaError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    return Plan(be, check_sites(sites), resolve_indices(layers, be.cfg.n_layers, "layers"),
                resolve_indices(heads, be.cfg.n_heads, "heads"),
                resolve_positions(positions, be.layout, grid=be.has_grid), base, source)
