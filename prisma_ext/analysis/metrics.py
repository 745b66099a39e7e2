"""Metrics for patching: functions of a model's output giving one number per example.

A metric is called as `metric(output, examples)`, where `output` [n, ...] is a batch of runs
and `examples` [n] says which input example each run belongs to (so per-example targets line
up); a plain `metric(output)` works too. It must return shape [n].

The patching methods also take what the other methods' `target=` takes (`as_metric`): a class
index or name, one per image, None (each clean image's predicted class), `LogitDiff(a, b)`, or
`ImageTextScore(texts)` where the model's output is CLIP's image embedding.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError, PrismaError
from .backend import Backend
from .targets import Target, as_target, bind


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
    scale = float(logit_scale.detach().exp()) if isinstance(logit_scale, Tensor) else logit_scale

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


ACCEPTED = ("a function metric(output, examples) or metric(output) -> [n], a class index or name, one "
            "class per image, None (each clean image's predicted class), px.LogitDiff(a, b), or "
            "px.ImageTextScore(texts) on a CLIP model")


def as_metric(backend: Backend, images: Tensor, metric: Any, output: Tensor | None = None
              ) -> Callable[[Tensor, Tensor], Tensor]:
    """A patching metric from `metric`: a callable comes back unchanged; a target (see
    `prisma_ext.analysis.targets`) is bound to `images` [batch, ...] (the clean images: None
    means the class the model predicts for each; `output`, the model's output on them where the
    caller has it, spares a forward pass) and becomes (output [n, ...], examples [n]) -> [n]:
    row i's score for image examples[i] (that image's class, prompt or pair of classes)."""
    if callable(metric) and not isinstance(metric, Target):
        return metric
    if not (metric is None or isinstance(metric, (Target, Integral, str, Tensor, Sequence))):
        raise InputError(f"metric: expected {ACCEPTED}; got {type(metric).__name__}")
    bound = bind(backend, images, as_target(metric), output)
    read_acts = _acts_reader(backend, bound)

    def score(output: Tensor, examples: Tensor) -> Tensor:
        return bound.score(output, read_acts(output), rows=examples.cpu())

    return score


def _acts_reader(backend: Backend, target: Target) -> Callable[[Tensor], Mapping[str, Tensor]]:
    """output -> the sites `target.table` reads. Patching sees only the output, so a target that
    reads a site works only where the output is that site (CLIP's image embedding)."""
    if not target.sites:
        return lambda output: {}
    if target.sites == ("hook_image_embed",) and _outputs_image_embed(backend):
        return lambda output: {"hook_image_embed": output}
    raise PrismaError(
        f"{target.describe()} as a patching metric reads {', '.join(target.sites)}, but patching sees only "
        "the model's output, and here it is not the image embedding (a zero-shot head is set, or this is "
        "not a CLIP vision tower). Use "
        "image_text_patching(clip, clean, corrupted, texts), or metric=clip_score_diff(text_embeds, scale) "
        "on the CLIP model without a zero-shot head, or a class / LogitDiff of the zero-shot head")


def _outputs_image_embed(backend: Backend) -> bool:
    """Whether the backend's output is a CLIP vision tower's image embedding [n, d_proj]."""
    from ..hooked.clip import HookedCLIP

    model, tower = backend.model, backend.vit
    if not isinstance(model, HookedCLIP) or tower is not model.visual or not tower.cfg.d_proj:
        return False
    return_type = getattr(backend, "return_type", None)
    return return_type == "embeds" or (return_type == "logits" and tower.head is None)
