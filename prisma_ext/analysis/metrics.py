"""The patching metrics of the previous release, as targets (`prisma_ext.analysis.targets`).

Each function here returns the target that scores the same thing, with a DeprecationWarning; the
patching methods take targets as `target=` like every other method:

    logit_diff(a, b)              -> px.LogitDiff(a, b)
    target_prob(c)                -> px.ClassProb(c)
    clip_score_diff(embeds, s)    -> px.ImageTextScore(embeds[0], versus=embeds[1], scale=s)
    metric(output, examples)      -> px.FunctionTarget(metric, per_image=True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from .._deprecated import warn
from ..errors import PrismaError
from .targets import ClassProb, FunctionTarget, ImageTextScore, LogitDiff, Target


def logit_diff(correct: int | Sequence[int] | Tensor, incorrect: int | Sequence[int] | Tensor) -> Target:
    """logit[correct] - logit[incorrect]: now `px.LogitDiff(correct, incorrect)`."""
    warn("prisma_ext.metrics.logit_diff", "px.LogitDiff(a, b)")
    return LogitDiff(correct, incorrect)


def target_prob(target: int | Sequence[int] | Tensor) -> Target:
    """softmax(logits)[target]: now `px.ClassProb(target)`."""
    warn("prisma_ext.metrics.target_prob", "px.ClassProb(c)")
    return ClassProb(target)


def clip_score_diff(text_embeds: Tensor, logit_scale: Tensor | float = 1.0) -> Target:
    """scale * (cos(image, text_0) - cos(image, text_1)) (one text: scale * cos(image, text_0)) of
    image embeddings: now `px.ImageTextScore(texts, versus=..., scale=...)`."""
    warn("prisma_ext.metrics.clip_score_diff", "px.ImageTextScore(texts, versus=other, scale=s)")
    scale = float(logit_scale.detach().exp()) if isinstance(logit_scale, Tensor) else float(logit_scale)
    embeds = text_embeds.detach()
    if embeds.ndim != 2 or embeds.shape[0] not in (1, 2):
        raise PrismaError(f"clip_score_diff takes one or two text embeddings [1 or 2, d_proj], got "
                          f"{tuple(embeds.shape)}")
    return ImageTextScore(embeds[:1].float(), versus=embeds[1:2].float() if embeds.shape[0] == 2 else None,
                          scale=scale)


def call_metric(metric: Callable, output: Tensor, examples: Tensor) -> Tensor:
    """`metric(output, examples)`, checked to give one number per run (the previous calling
    convention; targets score outputs with `target.score(output, acts, rows)`)."""
    warn("prisma_ext.metrics.call_metric", "a bound target's score(output, acts, rows)")
    bound = FunctionTarget(metric, per_image=True).bind(None, output, output.shape[0])
    return bound.score(output, {}, rows=examples)


__all__ = ["call_metric", "clip_score_diff", "logit_diff", "target_prob"]
