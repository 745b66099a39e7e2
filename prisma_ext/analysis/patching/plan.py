"""A patching request resolved against the model: which sites, layers, heads and position groups
become runs (`Plan`), how the runs are laid out and chunked (`Jobs`, `chunk_size`), and how a
sweep's values become results (`Plan.result`). Shared by activation, attribution and image-text
patching."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from ...errors import InputError, PrismaError, suggest
from ..backend import Backend
from ..result import AnalysisResult, ResultSet
from .positions import PositionGroups, resolve_positions

SITES = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "z": "blocks.{}.attn.hook_z",
}
HEAD_SITES = {"z"}
DIRECTIONS = ("denoising", "noising")


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


def resolve_indices(values: Any, n: int, what: str) -> list[int]:
    """`values` None or "all" (every index), one int, or distinct ints, each in [0, n)."""
    if values is None or (isinstance(values, str) and values == "all"):
        return list(range(n))
    if isinstance(values, Integral) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise InputError(f"{what}: expected 'all', None, an int or a list of ints, got {values!r}")
    values = values.tolist() if isinstance(values, Tensor) else list(values)
    if not values:
        raise InputError(f"{what}: got an empty list (None or 'all' means every one)")
    if not all(isinstance(v, Integral) and not isinstance(v, bool) for v in values):
        raise InputError(f"{what}: expected ints, got {values!r}")
    out = [int(v) for v in values]
    bad = [v for v in out if not 0 <= v < n]
    if bad:
        raise PrismaError(f"{what} must lie in [0, {n}), got {bad}")
    repeated = sorted({v for v in out if out.count(v) > 1})
    if repeated:
        raise InputError(f"{what}: {repeated} given more than once")
    return out


def check_pair(clean: Tensor, corrupted: Tensor) -> None:
    for name, x in (("clean", clean), ("corrupted", corrupted)):
        if not isinstance(x, Tensor):
            raise InputError(f"{name} must be a tensor, got {type(x).__name__}")
    if clean.shape != corrupted.shape:
        raise InputError(f"clean and corrupted inputs must have the same shape, got {tuple(clean.shape)} "
                         f"and {tuple(corrupted.shape)}")


@dataclass
class Jobs:
    """Patched runs of one site: example index, group index, head index (-1: all) and, for runs
    at several layers, each run's layer (None: one layer, given with the jobs)."""

    examples: Tensor
    groups: Tensor
    heads: Tensor
    layers: Tensor | None = None

    def __len__(self) -> int:
        return self.examples.shape[0]

    def chunks(self, size: int):
        for start in range(0, len(self), size):
            sl = slice(start, start + size)
            yield Jobs(self.examples[sl], self.groups[sl], self.heads[sl],
                       None if self.layers is None else self.layers[sl])


def make_jobs(n_examples: int, n_groups: int, heads: list[int] | None, layers: list[int] | None = None) -> Jobs:
    """Every (layer,) example, group, head combination, layer-major (so a chunk of consecutive jobs
    spans as few layers as possible)."""
    head_list = heads if heads is not None else [-1]
    axes = [torch.arange(n_examples), torch.arange(n_groups), torch.tensor(head_list)]
    if layers is not None:
        axes = [torch.tensor(layers), *axes]
    grid = torch.cartesian_prod(*axes).reshape(-1, len(axes))
    if layers is None:
        return Jobs(grid[:, 0], grid[:, 1], grid[:, 2])
    return Jobs(grid[:, 1], grid[:, 2], grid[:, 3], grid[:, 0])


# Activation budget of one chunk of patched runs. On a CPU, chunks that stay near the caches run
# fastest per run (vit_small: ~18 runs a chunk beat 64-180 by 1.2-1.7x); a GPU wants big chunks.
CPU_BUDGET_BYTES, GPU_BUDGET_BYTES = 1e8, 2e9
MAX_CHUNK = 512


def default_batch_size(n_tokens: int, d_model: int, d_mlp: int, n_heads: int, device: torch.device | str = "cpu",
                       budget_bytes: float | None = None) -> int:
    """How many runs to batch so one chunk's activations stay near `budget_bytes` (default:
    100 MB on a CPU, 2 GB on a GPU), between 1 and 512."""
    if budget_bytes is None:
        budget_bytes = CPU_BUDGET_BYTES if torch.device(device).type == "cpu" else GPU_BUDGET_BYTES
    per_run = 4 * n_tokens * (3 * max(d_mlp, 3 * d_model) + 2 * n_heads * n_tokens)
    return int(max(1, min(MAX_CHUNK, budget_bytes // per_run)))


def check_batch_size(batch_size: Any) -> int | None:
    """None (the default chunking) or a positive int."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int (runs per forward pass) or None for the default, "
                         f"got {batch_size!r}")
    return int(batch_size)


@dataclass
class Plan:
    """A resolved patching request: what runs where, for either patching method."""

    backend: Backend
    sites: list[str]
    layers: list[int]
    heads: list[int]
    groups: PositionGroups
    base_input: Tensor
    source_input: Tensor
    direction: str
    batch_size: int | None

    @property
    def n_examples(self) -> int:
        return self.base_input.shape[0]

    def names(self) -> list[str]:
        """Every (site, layer) site name the plan patches."""
        return [site_name(s, layer) for s in self.sites for layer in self.layers]

    def chunk_size(self) -> int:
        """Runs per forward pass: `batch_size`, or ~100 MB of activations a chunk (CPU) / 2 GB (GPU)."""
        if self.batch_size is not None:
            return self.batch_size
        cfg = self.backend.cfg
        return default_batch_size(self.layout.n_tokens, cfg.d_model, cfg.d_mlp, cfg.n_heads, self.base_input.device)

    @property
    def layout(self):
        be = self.backend
        return be.layout.for_image(*self.base_input.shape[-2:]) if be.has_grid else be.layout

    def clean_and_corrupted(self, base: Tensor, source: Tensor) -> tuple[Tensor, Tensor]:
        """(clean, corrupted) values from (base run, source run) values."""
        return (source, base) if self.direction == "denoising" else (base, source)

    def result(self, site: str, values: Tensor, m_clean: Tensor, m_corr: Tensor, normalize: bool,
               meta: dict, method: str) -> AnalysisResult:
        """One site's values [batch, layer, (head,) position] as an AnalysisResult."""
        if normalize:
            shape = (-1,) + (1,) * (values.ndim - 1)
            span = (m_clean - m_corr).float().cpu().view(shape)
            if torch.any(span.abs() < 1e-8):
                raise PrismaError("normalize=True: the clean and corrupted metrics are equal for some example")
            values = (values - m_corr.float().cpu().view(shape)) / span
        groups = self.groups
        dims = ("batch", "layer", "head", groups.dim) if site in HEAD_SITES else ("batch", "layer", groups.dim)
        coords = {"layer": self.layers, groups.dim: groups.labels}
        if site in HEAD_SITES:
            coords["head"] = self.heads
        be = self.backend
        return AnalysisResult(f"{method}: {site}", values, dims, self.layout,
                              be.class_names, coords, dict(meta, site=site))

    def results(self, values: dict[str, Tensor], m_clean: Tensor, m_corr: Tensor, normalize: bool,
                meta: dict, method: str = "activation patching") -> ResultSet:
        return ResultSet({site: self.result(site, v, m_clean, m_corr, normalize, meta, method)
                          for site, v in values.items()})


def make_plan(model, clean: Tensor, corrupted: Tensor, sites, positions, heads, layers, direction: str,
              batch_size: Any = None) -> Plan:
    """Check the inputs and resolve sites, layers, heads and positions against the model (the
    patch grid of the images' own size)."""
    be = Backend.of(model)
    check_pair(clean, corrupted)
    if clean.ndim == 0 or clean.shape[0] == 0:
        raise InputError("clean and corrupted: got an empty batch")
    if direction not in DIRECTIONS:
        raise PrismaError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    plan = Plan(be, check_sites(sites), resolve_indices(layers, be.cfg.n_layers, "layers"),
                resolve_indices(heads, be.cfg.n_heads, "heads"), None, base, source, direction,
                check_batch_size(batch_size))
    plan.groups = resolve_positions(positions, plan.layout, grid=be.has_grid)
    return plan
