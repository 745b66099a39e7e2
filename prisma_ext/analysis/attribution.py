"""Direct logit attribution: the target split over the embedding, each head, each MLP, and each
head's share over source tokens (CLS attribution)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, check_identity
from .backend import Backend
from .common import check_batch, in_chunks, layout_for
from .result import AnalysisResult
from .targets import Target, as_target

BY = ("layer", "head", "source")


def _check_by(by: Sequence[str]) -> set[str]:
    by = {by} if isinstance(by, str) else set(by)
    unknown = by - set(BY)
    if unknown or "layer" not in by:
        raise InputError(f"direct_logit_attribution: `by` takes 'layer' and optionally 'head' and "
                         f"'source', got {sorted(by)}")
    if "source" in by:
        by.add("head")
    return by


def _sites(n_layers: int, by: set[str]) -> list[str]:
    sites = ["blocks.0.hook_resid_pre", f"blocks.{n_layers - 1}.hook_resid_post"]
    for i in range(n_layers):
        sites += [f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out"]
        if "source" in by:
            sites += [f"blocks.{i}.attn.hook_v", f"blocks.{i}.attn.hook_pattern"]
        elif "head" in by:
            sites.append(f"blocks.{i}.attn.hook_z")
    return sites


def _read_positions(direction: Tensor) -> slice | Tensor:
    """The token positions a readout [batch, pos, d] reads: a slice when they are contiguous
    (CLS: 0; distilled: 0-1; average pool: the patches), else an index tensor."""
    found = direction.abs().sum((0, 2)).nonzero()[:, 0].tolist()
    if found and found == list(range(found[0], found[-1] + 1)):
        return slice(found[0], found[-1] + 1)
    return torch.tensor(found, dtype=torch.long, device=direction.device)


def check_sum(values: Tensor, score: Tensor) -> None:
    """DLA's identity: the components [batch, component] sum to the score [batch] they split."""
    check_identity(values.sum(-1), score, lambda miss, size: (
        f"direct_logit_attribution: the components sum to {float(values.sum(-1)[0]):.4g} where the score is "
        f"{float(score[0]):.4g} (largest miss {miss:.3g} over the batch): the output is not the linear readout "
        "of the final residual stream the method splits (a hook between the final norm and the output, or a "
        "head that is not linear). Give the adapter the real head (docs/adapters.md) instead of a hook"),
                   size=float(values.abs().sum(-1).max()))


def direct_logit_attribution(model: Any, images: Tensor, target: Any = None, *, by: Sequence[str] = BY,
                             batch_size: int | None = None, progress: bool = False) -> AnalysisResult:
    """Split the target score of each image into what each component writes directly into it.

    images [batch, C, H, W]; target: None (predicted class), a class, one per image,
    `LogitDiff(a, b)` or, for CLIP, `ImageTextScore(texts)`. Returns values [batch, component]
    with labels `coords["component"]`: "embed" (the residual stream entering block 0: patch
    and prefix embeddings, positions), per layer "L{i}.attn" (or, with "head" in `by`, each
    head "L{i}H{h}" and "L{i}.attn_bias", the output bias), "L{i}.mlp", and "bias" (the
    readout's constant: head bias, the final norm's bias through the head, CLIP's logit bias).

    The final norm's scale is frozen at its value on these images, as is standard (TL's
    `logit_attrs`): each component's write is centred, divided by that scale and dotted with
    the readout direction. With the scale frozen the components sum to the score exactly
    (`values.sum(-1) == meta["score"]`, tested to 1e-4). For `ImageTextScore` the image
    embedding's norm is frozen too (the cosine's denominator).

    With "head" in `by`, `part("head")` is [batch, layer, head]. With "source",
    `part("source")` [batch, layer, head, token] splits each head over the tokens it reads,
    through pattern x value: head h's write at query q is sum_k pattern[q, k] v[k] W_O, so
    source k's share of the score is sum_q pattern[q, k] (v[k] W_O . direction[q]) summed over
    the query positions the readout reads. This is "CLS attribution": which tokens each head
    moved into the pooled token. For an average-pool model (no CLS) the readout reads every
    patch, so it is the attribution of each source over all queries into the pooled readout.
    Summed over sources it gives the head's value in `part("head")`. SigLIP's attention-pool
    head is not linear and is refused. `batch_size`: images per forward pass (default all).
    """
    check_batch(images, "direct_logit_attribution")
    by = _check_by(by)
    backend = Backend.of(model)
    target = as_target(target)
    if not target.linear:
        raise InputError("direct_logit_attribution needs a class, a LogitDiff or an ImageTextScore as target "
                         f"(a linear readout), got {target.describe()}")
    backend.readout.require_linear("direct_logit_attribution")
    if "head" in by and backend.cfg.attn_norm:
        raise InputError("direct_logit_attribution by head: this model normalises the heads' outputs together "
                         "before the output projection (scale_attn_norm), so a head's write is not its own; split "
                         "by layer (by=('layer',))")
    return in_chunks(backend, images, target, batch_size, progress, "direct_logit_attribution",
                     lambda x, bound: _dla(backend, x, bound, by))


def _dla(backend: Backend, images: Tensor, target: Target, by: set[str]) -> AnalysisResult:
    vit, cfg = backend.vit, backend.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    with torch.no_grad():
        run, score, target = backend.evaluate(images, target, read=_sites(n_layers, by))
        acts = run.acts
        final = acts[f"blocks.{n_layers - 1}.hook_resid_post"]
        directions, const = target.readout(backend, acts, final.shape[1])
        direction = backend.readout.to_residual(directions.to(final), backend.readout.final_scale(final))
        queries = _read_positions(direction)
        dq = direction[:, queries]

        def write(x: Tensor) -> Tensor:  # [batch, pos, d] -> its contribution [batch]
            return torch.einsum("bqd,bqd->b", x[:, queries], dq)

        labels, columns = ["embed"], [write(acts["blocks.0.hook_resid_pre"])]
        per_head, per_source = [], []
        for i in range(n_layers):
            attn_out = acts[f"blocks.{i}.hook_attn_out"]
            if "head" in by:
                W_O = vit.blocks[i].attn.W_O  # [head, d_head, d]
                g = torch.einsum("bqd,hed->bqhe", dq, W_O.to(dq))  # what a unit of z at q adds
                if "source" in by:
                    v = acts[f"blocks.{i}.attn.hook_v"]  # [b, k, h, e]
                    pattern = acts[f"blocks.{i}.attn.hook_pattern"][:, :, queries]  # [b, h, q, k]
                    vg = torch.einsum("bkhe,bqhe->bhqk", v, g)
                    sources = (pattern * vg).sum(2)  # [b, h, k]
                    per_source.append(sources)
                    heads = sources.sum(-1)
                else:
                    z = acts[f"blocks.{i}.attn.hook_z"][:, queries]
                    heads = torch.einsum("bqhe,bqhe->bh", z, g)
                per_head.append(heads)
                bias = write(vit.blocks[i].attn.b_O.to(dq).expand_as(attn_out))
                labels += [f"L{i}H{h}" for h in range(n_heads)] + [f"L{i}.attn_bias"]
                columns += [*heads.unbind(-1), bias]
            else:
                labels.append(f"L{i}.attn")
                columns.append(write(attn_out))
            labels.append(f"L{i}.mlp")
            columns.append(write(acts[f"blocks.{i}.hook_mlp_out"]))
        labels.append("bias")
        columns.append(const.to(dq).expand(images.shape[0]))
        values = torch.stack(columns, dim=-1)
        check_sum(values, score)

    layout = layout_for(backend, images)
    names = backend.class_names
    meta = {"target": target.describe(), "score": score.detach(), "by": tuple(b for b in BY if b in by),
            "frozen": "final norm scale" + (" and image embedding norm" if target.sites else ""),
            "backend": backend.kind}
    parts = {}
    if per_head:
        parts["head"] = AnalysisResult("direct_logit_attribution/head", torch.stack(per_head, 1),
                                       ("batch", "layer", "head"), layout, names, {}, meta)
    if per_source:
        parts["source"] = AnalysisResult("direct_logit_attribution/source", torch.stack(per_source, 1),
                                         ("batch", "layer", "head", "token"), layout, names, {}, meta)
    return AnalysisResult("direct_logit_attribution", values, ("batch", "component"), layout, names,
                          {"component": labels}, meta, parts)
