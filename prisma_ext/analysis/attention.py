"""Attention maps on the patch grid: attention rollout (Abnar & Zuidema 2020) and
gradient-weighted attention (Chefer, Gur & Wolf 2021, "Generic attention-model explainability")."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .backend import Backend
from .common import NO_TARGET, check_batch, in_chunks, layout_for, patches_of
from .result import AnalysisResult
from .targets import Target

FUSIONS = ("mean", "max", "min")


def _pattern_sites(n_layers: int, start: int = 0) -> list[str]:
    return [f"blocks.{i}.attn.hook_pattern" for i in range(start, n_layers)]


def _discard(attn: Tensor, ratio: float) -> Tensor:
    """Zero the weakest `ratio` of each query row's keys [batch, q, k] (never the diagonal)."""
    n_drop = int(attn.shape[-1] * ratio)
    if n_drop == 0:
        return attn
    eye = torch.eye(attn.shape[-1], dtype=torch.bool, device=attn.device)
    ranked = attn.masked_fill(eye, float("inf"))
    drop = ranked.topk(n_drop, dim=-1, largest=False).indices
    return attn.scatter(-1, drop, 0.0)


def _patch_map(method: str, weights: Tensor, relevance: Tensor, images: Tensor, backend: Backend,
               meta: dict) -> AnalysisResult:
    """The readout's row of a token-to-token relevance [batch, pos, pos] on the patches."""
    layout = layout_for(backend, images)
    per_token = torch.einsum("bq,bqk->bk", weights, relevance)
    return AnalysisResult(method, patches_of(per_token, layout), ("batch", "patch"), layout,
                          backend.class_names, {}, {**meta, "backend": backend.kind})


def attention_rollout(model: Any, images: Tensor, target: Any = None, *, head_fusion: str = "mean",
                      discard_ratio: float = 0.0, batch_size: int | None = None,
                      progress: bool = False) -> AnalysisResult:
    """Attention rollout: how much each patch reaches the readout through all layers' attention.

    Per layer the heads' patterns are fused (`head_fusion`: "mean", "max" or "min"), the
    weakest `discard_ratio` of each row's keys are zeroed (the diagonal kept), the residual
    connection is added as 0.5 A + 0.5 I and rows renormalised; the layers' matrices are
    multiplied. The map [batch, patch] is the readout's row: the CLS token's (a distilled
    model: CLS and distillation averaged; an average-pool model: the mean over the pooled
    patches; SigLIP: the attention-pool head's weights), with prefix tokens (registers,
    distillation) dropped from the columns; they still carry flow between layers. Rollout
    follows attention, not a score: `target` is taken for the common signature and must be None.
    """
    check_batch(images, "attention_rollout")
    if head_fusion not in FUSIONS:
        raise InputError(f"head_fusion must be one of {FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise InputError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if target is not None:
        raise InputError("attention_rollout follows the attention, whatever the score: it takes no target "
                         "(gradient_attention weighs attention by a target's gradient)")
    backend = Backend.of(model)
    meta = {"head_fusion": head_fusion, "discard_ratio": discard_ratio}
    return in_chunks(backend, images, NO_TARGET, batch_size, progress, "attention_rollout",
                     lambda x, _: _rollout(backend, x, head_fusion, discard_ratio, meta))


def _rollout(backend: Backend, images: Tensor, head_fusion: str, discard_ratio: float, meta: dict) -> AnalysisResult:
    cfg = backend.cfg
    sites = _pattern_sites(cfg.n_layers)
    final = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        run = backend.run(images, read=[*sites, final])
        rollout = None
        for site in sites:
            pattern = run.acts[site]  # [batch, head, q, k]
            fused = getattr(pattern, head_fusion)(dim=1)
            fused = fused if head_fusion == "mean" else fused.values
            fused = _discard(fused, discard_ratio)
            eye = torch.eye(fused.shape[-1], device=fused.device, dtype=fused.dtype)
            a = 0.5 * fused + 0.5 * eye
            a = a / a.sum(-1, keepdim=True)
            rollout = a if rollout is None else a @ rollout
        weights = backend.readout.query_weights(run.acts[final])
    return _patch_map("attention_rollout", weights, rollout, images, backend, meta)


def gradient_attention(model: Any, images: Tensor, target: Any = None, *, start_layer: int = 0,
                       batch_size: int | None = None, progress: bool = False) -> AnalysisResult:
    """Gradient-weighted attention relevance (Chefer et al. 2021) on the patch grid.

    R starts as the identity; for each layer from `start_layer` on, with A the heads' patterns
    and dA the gradient of the target score with respect to them,
    Abar = mean over heads of relu(dA * A), and R <- R + Abar R. The map [batch, patch] is the
    readout's row of R (see `attention_rollout` for which row that is), prefix tokens dropped.
    target: None (predicted class), a class, one per image, `LogitDiff(a, b)`,
    `ImageTextScore(texts)` or a function of the output. `batch_size`: images per pass.
    """
    check_batch(images, "gradient_attention")
    backend = Backend.of(model)
    cfg = backend.cfg
    if not 0 <= start_layer < cfg.n_layers:
        raise InputError(f"start_layer must be in [0, {cfg.n_layers}), got {start_layer}")
    return in_chunks(backend, images, target, batch_size, progress, "gradient_attention",
                     lambda x, bound: _gradient_attention(backend, x, bound, start_layer))


def _gradient_attention(backend: Backend, images: Tensor, target: Target, start_layer: int) -> AnalysisResult:
    cfg = backend.cfg
    sites = _pattern_sites(cfg.n_layers, start_layer)
    final = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    run, _, target = backend.evaluate(images, target, read=[*sites, final], grad=True)
    with torch.no_grad():
        n_tokens = run.acts[sites[0]].shape[-1]
        first = run.acts[sites[0]]
        relevance = torch.eye(n_tokens, device=first.device, dtype=first.dtype).expand(images.shape[0], -1, -1)
        for site in sites:
            cam = (run.grads[site] * run.acts[site].detach()).clamp(min=0).mean(1)
            relevance = relevance + cam @ relevance
        weights = backend.readout.query_weights(run.acts[final].detach())
    return _patch_map("gradient_attention", weights, relevance, images, backend,
                      {"target": target.describe(), "start_layer": start_layer})
