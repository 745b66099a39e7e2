"""Run several attribution methods (ours and Captum's) on the same images and score them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .attention import attention_rollout, gradient_attention
from .attribution import direct_logit_attribution
from .backend import Backend
from .captum_attr import METHODS as CAPTUM_METHODS
from .captum_attr import canonical_method, captum_attribution
from .common import check_batch, layout_for
from .faithfulness import BETTER, as_patch_map, score_maps
from .progress import Progress
from .result import AnalysisResult
from .targets import Target, bind

OURS = ("gradient_attention", "attention_rollout", "cls_attribution", "random")
DEFAULT_METHODS = ("gradient_attention", "attention_rollout", "cls_attribution", *CAPTUM_METHODS, "random")


def cls_attribution_map(model: Any, images: Tensor, target: Any = None) -> AnalysisResult:
    """Direct logit attribution by source, summed over layers and heads: what all heads moved
    from each patch into the readout [batch, patch]."""
    dla = direct_logit_attribution(model, images, target, by=("layer", "head", "source"))
    source = dla.part("source")
    layout = source.layout
    values = source.values.sum((1, 2))[:, layout.n_prefix: layout.n_prefix + layout.n_patches]
    return AnalysisResult("cls_attribution", values, ("batch", "patch"), layout, source.class_names, {},
                          dict(dla.meta))


def random_map(model: Any, images: Tensor, seed: int = 0) -> AnalysisResult:
    """A uniformly random map [batch, patch] (seeded): the floor every method should beat."""
    backend = Backend.of(model)
    layout = layout_for(backend, images)
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(images.shape[0], layout.n_patches, generator=gen).to(images.device)
    return AnalysisResult("random", values, ("batch", "patch"), layout, backend.class_names, {}, {"seed": seed})


Method = str | tuple[str, dict] | tuple[str, Callable[..., Any]]


def _runner(spec: Method, seed: int) -> tuple[str, Callable[[Any, Tensor, Target], Any]]:
    """(label, fn(model, images, target) -> map) for one entry of `methods`."""
    if isinstance(spec, tuple) and len(spec) == 2 and callable(spec[1]):
        return spec[0], spec[1]
    name, opts = spec if isinstance(spec, tuple) else (spec, {})
    if not isinstance(name, str) or not isinstance(opts, dict):
        raise InputError(f"methods: expected a name, (name, options) or (label, fn), got {spec!r}")
    if name == "gradient_attention":
        return name, lambda m, x, t: gradient_attention(m, x, t, **opts)
    if name == "attention_rollout":
        return name, lambda m, x, t: attention_rollout(m, x, **opts)
    if name == "cls_attribution":
        return name, lambda m, x, t: cls_attribution_map(m, x, t)
    if name == "random":
        return name, lambda m, x, t: random_map(m, x, seed=opts.get("seed", seed))
    method = canonical_method(name)
    return method, lambda m, x, t: captum_attribution(m, x, t, method=method, seed=seed, **opts)


def _applicable(backend: Backend, target: Target) -> tuple[str, ...]:
    """The default methods that can run on this model and target."""
    linear = target.linear and backend.readout.is_linear
    return tuple(m for m in DEFAULT_METHODS if linear or m != "cls_attribution")


@dataclass(repr=False)
class ComparisonResult(AnalysisResult):
    """values [method, column]: each metric's mean AUC over the batch, then "seconds" (the time
    to compute the method's maps). `part(method)` is that method's map."""

    def to_dataframe(self):
        """One row per method: method, each metric's AUC, seconds."""
        import pandas as pd

        frame = pd.DataFrame(self.values.double().numpy(), columns=self.labels("column"))
        frame.insert(0, "method", self.labels("method"))
        return frame

    def plot(self, facet: str | None = None, title: str | None = None, **index: int):
        """Bar charts: one panel per column (each AUC, seconds; the default, `facet="column"`)
        with a bar per method, or one panel per method (`facet="method"`)."""
        from ..viz.figures import comparison_figure

        return comparison_figure(self, facet=facet or "column", title=title)


def compare_attributions(model: Any, images: Tensor, target: Any = None, *,
                         methods: Sequence[Method] | None = None,
                         curves: Sequence[str] | str = ("deletion", "insertion"), seed: int = 0,
                         batch_size: int = 128, progress: bool = False, metric: Any = None,
                         **faithfulness_options: Any) -> ComparisonResult:
    """Compute each method's map on the same images and target, time it, and score all maps as
    `faithfulness` does (mean AUC over the batch; all perturbed images of all methods batched
    together; `faithfulness_options`: n_steps, baseline, score, batch_size).

    methods: names of ours ("gradient_attention", "attention_rollout", "cls_attribution":
    direct logit attribution by source summed over heads, "random") and Captum's (see
    `captum_attribution`), `(name, options)` pairs, or `(label, fn(model, images, target))`
    pairs returning a map. Default: all that apply to the model and target. The target is
    bound once (the predicted class by default) so every method explains the same score.
    Returns a ComparisonResult: `to_dataframe()` gives one table (method, deletion, insertion,
    seconds); `part(method)` the map. `curves` (`metric=` is its old name) and `batch_size` are
    faithfulness's; `progress`: a bar over the methods.
    """
    if metric is not None:
        from .._deprecated import warn

        warn("compare_attributions(metric=...)", "compare_attributions(curves=...)")
        curves = metric
    check_batch(images, "compare_attributions")
    backend = Backend.of(model)
    target = bind(backend, images, target)
    specs = list(methods) if methods is not None else list(_applicable(backend, target))
    if not specs:
        raise InputError("compare_attributions: no methods given")
    layout = layout_for(backend, images)
    labels, seconds, maps = [], [], {}
    with Progress(len(specs), progress, "compare_attributions", unit="method") as bar:
        for spec in specs:
            label, fn = _runner(spec, seed)
            start = time.perf_counter()
            result = fn(model, images, target)
            seconds.append(time.perf_counter() - start)
            labels.append(label)
            maps[label] = result if isinstance(result, AnalysisResult) else AnalysisResult(
                label, torch.as_tensor(result).reshape(images.shape[0], -1), ("batch", "patch"), layout)
            bar.update(1)
    flat = [as_patch_map(maps[label], layout, images.shape[0]).to(images.device) for label in labels]
    names, auc, _, _, prob = score_maps(backend, images, flat, target, curves, batch_size=batch_size,
                                        progress=progress, **faithfulness_options)
    values = torch.cat([auc.mean(1), torch.tensor(seconds)[:, None]], dim=1)  # [method, metric + 1]
    meta = {"target": target.describe(), "metric": names, "better": {m: BETTER[m] for m in names},
            "score": "prob" if prob else "raw", "backend": backend.kind}
    return ComparisonResult("compare_attributions", values, ("method", "column"), layout, backend.class_names,
                            {"method": labels, "column": [*names, "seconds"]}, meta, maps)
