"""Activation patching, batched: many patched runs per forward pass, and on the TL backend the
corrupted run's activations below the patched layer are reused instead of recomputed.

Denoising (the default) patches the clean run's activation into the corrupted run; noising
patches the corrupted activation into the clean run. Either way `normalize=True` rescales the
metric so that 0 is the corrupted run's value and 1 the clean run's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, PrismaError
from .backend import Backend
from .metrics import as_metric, call_metric
from .positions import PositionGroups
from .result import AnalysisResult
from .results import ResultSet
from .sweep import (
    HEAD_SITES,
    Jobs,
    default_batch_size,
    make_jobs,
    make_plan,
    site_name,
)


def check_pair(clean: Tensor, corrupted: Tensor) -> None:
    for name, x in (("clean", clean), ("corrupted", corrupted)):
        if not isinstance(x, Tensor):
            raise InputError(f"{name} must be a tensor, got {type(x).__name__}")
    if clean.shape != corrupted.shape:
        raise InputError(f"clean and corrupted inputs must have the same shape, got {tuple(clean.shape)} "
                         f"and {tuple(corrupted.shape)}")


def patch_rows(value: Tensor, source: Tensor, token_mask: Tensor, heads: Tensor) -> Tensor:
    """Replace, row by row, the masked tokens (and one head, where heads >= 0) of `value` with
    `source`. value/source [n, pos, ...]; token_mask [n, pos]; heads [n]."""
    mask, heads = token_mask.to(value.device), heads.to(value.device)
    if value.ndim == 4:  # [n, pos, head, d_head]
        head_mask = torch.ones(value.shape[0], value.shape[2], dtype=torch.bool, device=value.device)
        picked = heads >= 0
        if picked.any():
            head_mask[picked] = torch.nn.functional.one_hot(heads[picked], value.shape[2]).bool()
        mask = mask[:, :, None] & head_mask[:, None, :]
    while mask.ndim < value.ndim:
        mask = mask.unsqueeze(-1)
    return torch.where(mask, source.to(value.dtype), value)


class Sweep:
    """Runs the patched forwards of one (site, layer) for a backend, chunk by chunk."""

    def __init__(self, backend: Backend, base_input: Tensor, base_cache: dict, source_cache: dict,
                 groups: PositionGroups, reuse: bool, run_from: Callable | None = None):
        self.be, self.base_input, self.base_cache, self.source_cache = backend, base_input, base_cache, source_cache
        self.group_mask = groups.mask(backend_tokens(base_cache))
        self.reuse, self.run_from = reuse, run_from

    def outputs(self, site: str, layer: int, jobs: Jobs) -> Tensor:
        name = site_name(site, layer)
        examples = jobs.examples
        token_mask = self.group_mask[jobs.groups]
        source = self.source_cache[name][examples]

        def edit(value: Tensor) -> Tensor:
            return patch_rows(value, source, token_mask, jobs.heads)

        if not self.reuse:
            return self.be.run(self.base_input[examples], edit={name: edit}).output
        resid = self.base_cache[site_name("resid_pre", layer)][examples]
        if site == "resid_pre":
            return self.run_from(edit(resid), layer, {}, examples)
        return self.run_from(resid, layer, {name: edit}, examples)


def backend_tokens(cache: dict) -> int:
    return next(iter(cache.values())).shape[1]


def activation_patching(model, clean: Tensor, corrupted: Tensor, metric: Any,
                        sites=("resid_pre", "attn_out", "mlp_out", "z"), positions="all", heads="all",
                        layers=None, batch_size: int | None = None, direction: str = "denoising",
                        normalize: bool = False, reuse: bool | None = None, progress: bool = True) -> ResultSet:
    """Patch each (site, layer, position group[, head]) from one run into the other; record `metric`.

    clean, corrupted: images [batch, channels, H, W] (same shape). metric: metric(output, examples)
    -> [n] (`prisma_ext.analysis.metrics`: logit_diff, target_prob, clip_score_diff), or what the
    other methods' `target=` takes: a class index or name, one per image, None (each clean image's
    predicted class), px.LogitDiff(a, b), px.ImageTextScore(texts) on CLIP (see `as_metric`).
    sites: "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z" (per head).
    positions: "all", "prefix", "patches", "rows", "cols", a patch-grid mask, token indices or
    groups (see `resolve_positions`). heads: "all" or indices (for "z"). layers: None (all) or
    indices. batch_size: patched runs per forward pass (default: ~100 MB of activations a chunk on
    a CPU, where cache-sized chunks run fastest; ~2 GB on a GPU).
    reuse: rerun only the layers from the patched one on (default: True on the TL backend).
    Returns a ResultSet: site -> AnalysisResult with values [batch, layer, position] (plus a
    head axis for "z"), and meta holding the clean and corrupted metric values.
    """
    plan = make_plan(model, clean, corrupted, sites, positions, heads, layers, direction)
    be, sites, layer_list, head_list, groups = plan.backend, plan.sites, plan.layers, plan.heads, plan.groups
    base_input, source_input = plan.base_input, plan.source_input
    cfg = be.cfg
    reuse = be.kind == "tl" if reuse is None else reuse
    if reuse and be.kind != "tl":
        raise PrismaError("reuse=True restarts the forward pass mid-model, which only the TL backend does")
    names = [site_name(s, layer) for s in sites for layer in layer_list]
    if reuse:
        names += [site_name("resid_pre", layer) for layer in layer_list]
    with torch.no_grad():
        base = be.run(base_input, read=names)
        source = be.run(source_input, read=names)
        n = clean.shape[0]
        examples = torch.arange(n)
        metric = as_metric(be, clean, metric, source.output if direction == "denoising" else base.output)
        m_base = call_metric(metric, base.output, examples)
        m_source = call_metric(metric, source.output, examples)
    m_clean, m_corr = (m_source, m_base) if direction == "denoising" else (m_base, m_source)

    sweep = Sweep(be, base_input, base.acts, source.acts, groups, reuse, _run_from(be) if reuse else None)
    size = batch_size or default_batch_size(be.layout.n_tokens, cfg.d_model, cfg.d_mlp, cfg.n_heads, base_input.device)
    todo = [(s, layer) for s in sites for layer in layer_list]
    total = sum(len(make_jobs(n, len(groups), head_list if s in HEAD_SITES else None)) for s, _ in todo)
    results: dict[str, Tensor] = {}
    with torch.no_grad(), _progress(total, progress, "activation patching") as bar:
        for site, layer in todo:
            site_heads = head_list if site in HEAD_SITES else None
            jobs = make_jobs(n, len(groups), site_heads)
            shape = (n, len(layer_list), *([len(site_heads)] if site_heads else []), len(groups))
            out = results.setdefault(site, torch.zeros(shape))
            li = layer_list.index(layer)
            for chunk in jobs.chunks(size):
                value = call_metric(metric, sweep.outputs(site, layer, chunk), chunk.examples).float().cpu()
                if site_heads:
                    out[chunk.examples, li, chunk.heads.clone().apply_(site_heads.index), chunk.groups] = value
                else:
                    out[chunk.examples, li, chunk.groups] = value
                bar.update(len(chunk))
    meta = dict(direction=direction, normalized=normalize, clean_metric=m_clean.float().cpu(),
                corrupted_metric=m_corr.float().cpu(), backend=be.kind, reuse=reuse)
    return ResultSet({site: _result(site, values, m_clean, m_corr, normalize, be, layer_list, head_list, groups, meta)
                      for site, values in results.items()})


def _result(site, values, m_clean, m_corr, normalize, be, layer_list, head_list, groups, meta) -> AnalysisResult:
    if normalize:
        shape = (-1,) + (1,) * (values.ndim - 1)
        span = (m_clean - m_corr).float().cpu().view(shape)
        if torch.any(span.abs() < 1e-8):
            raise PrismaError("normalize=True: the clean and corrupted metrics are equal for some example")
        values = (values - m_corr.float().cpu().view(shape)) / span
    dims = ("batch", "layer", "head", groups.dim) if site in HEAD_SITES else ("batch", "layer", groups.dim)
    coords = {"layer": layer_list, groups.dim: groups.labels}
    if site in HEAD_SITES:
        coords["head"] = head_list
    return AnalysisResult(f"activation patching: {site}", values, dims, be.layout, be.class_names, coords,
                          dict(meta, site=site))


def _run_from(be: Backend) -> Callable:
    """run(resid, layer, {site: edit}, examples) -> output, restarting the tower at `layer`. The
    last block carries only the readout's tokens (see run_from) unless an edit, or a hook a
    user left there, needs every token in it."""
    tower = be.vit
    last_block = f"blocks.{len(tower.blocks) - 1}."
    user_hooks = any(m._forward_hooks or m._forward_pre_hooks for m in tower.blocks[-1].modules())

    def run(resid: Tensor, layer: int, edits: dict, examples: Tensor) -> Tensor:
        hooks = [(name, _as_hook(fn)) for name, fn in edits.items()]
        readout_only = not user_hooks and not any(name.startswith(last_block) for name in edits)
        with tower.hooks(fwd_hooks=hooks):
            return be.continue_from(resid, layer, examples, readout_only)

    return run


def _as_hook(fn: Callable) -> Callable:
    return lambda value, hook: fn(value)


class _progress:
    """A tqdm bar on stderr when asked (and tqdm is there), else a no-op."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="run", leave=False)
            except ImportError:  # pragma: no cover
                self.bar = None

    def __enter__(self):
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
