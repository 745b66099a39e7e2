"""Metrics for patching: functions of a model's output giving one number per example.

A metric is called as `metric(output, examples)`, where `output` [n, ...] is a batch of runs
and `examples` [n] says which input example each run belongs to (so per-example targets line
up); a plain `metric(output)` works too. It must return shape [n].
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PrismaError


def _per_example(target, examples: Tensor, device) -> Tensor:
    target = torch.as_tensor(target, device=device)
    return target.expand(examples.shape) if target.ndim == 0 else target[examples]


def logit_diff(correct: int | Sequence[int] | Tensor, incorrect: int | Sequence[int] | Tensor) -> Callable:
    """logit[correct] - logit[incorrect] (class ids, one or one per example)."""

    def metric(output: Tensor, examples: Tensor) -> Tensor:
        rows = torch.arange(output.shape[0], device=output.device)
        c, i = _per_example(correct, examples, output.device), _per_example(incorrect, examples, output.device)
        return output[rows, c] - output[rows, i]

    return metric


def target_prob(target: int | Sequence[int] | Tensor) -> Callable:
    """softmax(logits)[target] (a class id, or one per example)."""

    def metric(output: Tensor, examples: Tensor) -> Tensor:
        rows = torch.arange(output.shape[0], device=output.device)
        return output.softmax(-1)[rows, _per_example(target, examples, output.device)]

    return metric


def clip_score_diff(text_embeds: Tensor, logit_scale: Tensor | float = 1.0) -> Callable:
    """For image embeddings: scale * (cos(image, text_0) - cos(image, text_1)); with one text
    embedding, scale * cos(image, text_0). `text_embeds` [1 or 2, d_proj]."""
    texts = F.normalize(text_embeds.detach(), dim=-1)
    scale = float(torch.as_tensor(logit_scale).exp()) if isinstance(logit_scale, Tensor) else logit_scale

    def metric(output: Tensor, examples: Tensor) -> Tensor:
        sims = scale * F.normalize(output, dim=-1) @ texts.T
        return sims[:, 0] - sims[:, 1] if texts.shape[0] > 1 else sims[:, 0]

    return metric


def call_metric(metric: Callable, output: Tensor, examples: Tensor) -> Tensor:
    """Call a metric with or without `examples` and check it gives one number per run."""
    try:
        n_params = len(inspect.signature(metric).parameters)
    except (TypeError, ValueError):
        n_params = 2
    value = metric(output, examples) if n_params >= 2 else metric(output)
    if not isinstance(value, Tensor) or tuple(value.shape) != (output.shape[0],):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise PrismaError(f"the metric must return one number per example, shape ({output.shape[0]},); "
                          f"got {shape}")
    return value
