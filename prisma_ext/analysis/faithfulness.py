"""Faithfulness of attribution maps: remove or insert patches in map order and watch the score.

Deletion / insertion (Petsiuk et al. 2018, RISE): the target's probability as the most
important patches are replaced by a baseline / revealed on it; positive / negative
perturbation (Chefer et al. 2021): top-1 accuracy on the target class as the most / least
important patches are removed. Each curve's area under it, over the fraction of patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..hooked.inputs import check_images
from .backend import Backend
from .common import check_batch, layout_for
from .progress import Progress
from .result import AnalysisResult
from .targets import Target, bind

METRICS = ("deletion", "insertion", "perturbation")
BETTER = {"deletion": "lower", "insertion": "higher", "pos_perturbation": "lower", "neg_perturbation": "higher"}


def as_patch_map(maps: Any, layout, batch: int) -> Tensor:
    """Maps as [batch, n_patches]: an AnalysisResult on the grid, or a tensor [batch, rows, cols]
    or [batch, n_patches]."""
    if isinstance(maps, AnalysisResult):
        maps = maps.grid()
    if not isinstance(maps, Tensor):
        raise InputError(f"maps: expected an AnalysisResult or a tensor [batch, rows, cols], got {type(maps).__name__}")
    rows, cols = layout.grid
    if maps.shape in ((batch, rows, cols), (batch, rows * cols)):
        flat = maps.detach().reshape(batch, rows * cols).float()
        if not torch.isfinite(flat).all():
            raise InputError("maps contain NaN or infinite values")
        return flat
    raise InputError(f"maps: expected [batch, rows, cols] = [{batch}, {rows}, {cols}] (or [{batch}, "
                     f"{rows * cols}]), got {tuple(maps.shape)}")


def make_baseline(images: Tensor, baseline: Any, patch_size: tuple[int, int]) -> Tensor:
    """What removed patches become: "zeros", "mean" (each image's mean colour), "blur" (a
    Gaussian blur, sigma half a patch) or a tensor broadcastable to the images."""
    if isinstance(baseline, Tensor):
        try:
            return baseline.to(images).expand_as(images)
        except RuntimeError:
            raise InputError(f"baseline {tuple(baseline.shape)} does not broadcast to images "
                             f"{tuple(images.shape)}") from None
    if baseline == "zeros":
        return torch.zeros_like(images)
    if baseline == "mean":
        return images.mean((-2, -1), keepdim=True).expand_as(images)
    if baseline == "blur":
        sigma = max(patch_size) / 2
        radius = int(2 * sigma)
        x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
        k = torch.exp(-x ** 2 / (2 * sigma ** 2))
        k = k / k.sum()
        c = images.shape[1]
        padded = F.pad(images, (radius,) * 4, mode="replicate")
        out = F.conv2d(padded, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        return F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    raise InputError(f"baseline must be 'zeros', 'mean', 'blur' or a tensor, got {baseline!r}")


def _steps(n_patches: int, n_steps: int | None) -> Tensor:
    """How many patches are removed at each step [n_steps + 1], from 0 to all."""
    n = min(n_patches, 16) if n_steps is None else n_steps
    if n < 1:
        raise InputError(f"n_steps must be >= 1, got {n_steps}")
    return torch.round(torch.arange(n + 1) * n_patches / n).long()


def _rank(maps: Tensor, descending: bool) -> Tensor:
    """Rank of each patch [..., patch] (0 = first to go), ties broken by patch index."""
    order = torch.sort(maps, dim=-1, descending=descending, stable=True).indices
    return torch.argsort(order, dim=-1)


# the perturbed runs a metric needs: (rank order descending?, reveal on the baseline?)
RUNS = {"deletion": (True, False), "pos_perturbation": (True, False), "insertion": (True, True),
        "neg_perturbation": (False, False)}


def _metric_names(metric: Sequence[str] | str) -> list[str]:
    metric = [metric] if isinstance(metric, str) else list(metric)
    for m in metric:
        if m not in METRICS:
            raise InputError(f"faithfulness: unknown metric {m!r} in curves=; choose from {METRICS}")
    names = [*metric, "pos_perturbation", "neg_perturbation"] if "perturbation" in metric else metric
    return [m for m in BETTER if m in names]


def _run_all(backend: Backend, images: Tensor, base: Tensor, target: Target, ranks: Tensor, inserts: Tensor,
             counts: Tensor, layout, prob: bool, batch_size: int, progress: bool) -> tuple[Tensor, Tensor]:
    """Score every perturbed image: for run r, image b and step s, image b with the patches of
    rank < counts[s] under ranks[r, b] removed (or, if inserts[r], revealed on the baseline).
    Each distinct image is scored once (`_distinct_images`), chunk by chunk. Returns (score,
    top-1 hit) [runs, batch, step]; for a target that is not a class, the hit is the raw score."""
    n_runs, batch, _ = ranks.shape
    n_steps = len(counts)
    rows, cols = layout.grid
    ph, pw = layout.patch_size
    example, replaced, inverse = _distinct_images(ranks, inserts, counts.to(ranks.device))
    example, replaced = example.to(images.device), replaced.to(images.device)
    total = len(example)
    columns = target.columns.to(images.device)
    scores, hits = [], []
    with Progress(total, progress, "faithfulness", unit="image") as bar:
        for start in range(0, total, batch_size):
            b, chosen = example[start:start + batch_size], replaced[start:start + batch_size]
            mask = chosen.to(images.dtype).view(-1, 1, rows, cols).repeat_interleave(ph, -2).repeat_interleave(pw, -1)
            x, y = images[b], base[b]
            mixed = x + (y - x) * mask
            with torch.no_grad():
                run, raw, _ = backend.evaluate(mixed, target.select(b.cpu()))
            col = columns[b, None]
            logits = run.output  # for a class target: the head's logits
            scores.append(logits.softmax(-1).gather(1, col)[:, 0] if prob else raw)
            hits.append((logits.argmax(-1) == col[:, 0]).to(raw.dtype) if target.is_class() else raw)
            bar.update(len(b))
    shape = (n_runs, batch, n_steps)
    inverse = inverse.to(images.device)
    return torch.cat(scores)[inverse].view(shape), torch.cat(hits)[inverse].view(shape)


def _distinct_images(ranks: Tensor, inserts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct perturbed images of every (run, image, step), each run once: (image index
    [n], patches replaced by the baseline [n, patch], and for every (run, image, step),
    flattened, its row). Revealing patches on the baseline is replacing
    the others, so an insertion image and a deletion image can be the same one; so are every
    curve's first and last images (nothing or everything replaced), for all maps at once."""
    n_runs, batch, _ = ranks.shape
    chosen = ranks[:, :, None, :] < counts[None, None, :, None]  # [run, image, step, patch]: revealed/removed
    replaced = torch.where(inserts.view(-1, 1, 1, 1), ~chosen, chosen)
    example = torch.arange(batch, device=ranks.device).view(1, batch, 1).expand(n_runs, batch, len(counts))
    keys = torch.cat([example.reshape(-1, 1), replaced.reshape(-1, replaced.shape[-1]).long()], dim=1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    return unique[:, 0], unique[:, 1:].bool(), inverse


def score_maps(backend: Backend, images: Tensor, maps: Sequence[Tensor], target: Target,
               metric: Sequence[str] | str = METRICS, n_steps: int | None = None, baseline: Any = "zeros",
               score: str = "auto", batch_size: int = 128, progress: bool = False
               ) -> tuple[list[str], Tensor, Tensor, Tensor, bool]:
    """Curves of several maps [batch, n_patches] at once, all their perturbed images batched:
    (metric names, AUC [map, batch, metric], curves [map, batch, metric, step], fractions
    [step], whether the score is a probability)."""
    if score not in ("auto", "prob", "raw"):
        raise InputError(f"score must be 'auto', 'prob' or 'raw', got {score!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    if score == "prob" and not target.is_class():
        raise InputError(f"score='prob' needs a class target (a softmax over classes); {target.describe()} "
                         "takes score='raw'")
    names = _metric_names(metric)
    layout = layout_for(backend, images)
    prob = score == "prob" or (score == "auto" and target.is_class())
    base = make_baseline(images, baseline, layout.patch_size)
    counts = _steps(layout.n_patches, n_steps)
    runs = list(dict.fromkeys(RUNS[m] for m in names))  # distinct perturbed runs per map
    stacked = torch.stack(list(maps))  # [map, batch, patch]
    ranks = torch.stack([_rank(stacked, desc) for desc, _ in runs], 1).flatten(0, 1)  # [map * run, b, p]
    inserts = torch.tensor([ins for _, ins in runs], device=images.device).repeat(len(maps))
    s, hit = _run_all(backend, images, base, target, ranks, inserts, counts, layout, prob, batch_size, progress)
    s, hit = s.view(len(maps), len(runs), *s.shape[1:]), hit.view(len(maps), len(runs), *hit.shape[1:])
    curves = torch.stack([(hit if m.endswith("perturbation") else s)[:, runs.index(RUNS[m])] for m in names], 2)
    x = counts.double() / layout.n_patches
    auc = torch.from_numpy(np.trapezoid(curves.double().cpu().numpy(), x.numpy(), axis=-1)).float()
    return names, auc, curves.cpu(), x, prob


def faithfulness(model: Any, images: Tensor, target: Any = None, *old_target: Any, maps: Any = None,
                 curves: Sequence[str] | str = METRICS, n_steps: int | None = None, baseline: Any = "zeros",
                 score: str = "auto", batch_size: int = 128, progress: bool = False,
                 metric: Any = None) -> AnalysisResult:
    """Deletion / insertion AUC and positive / negative perturbation AUC of an attribution map.

    images [batch, C, H, W]; maps: an AnalysisResult on the grid or a tensor [batch, rows,
    cols] (higher = more important). Patches are removed (replaced by `baseline`: "zeros",
    "mean", "blur" or a tensor) in map order (ties: lower patch index first), in `n_steps`
    steps (default min(n_patches, 16)) from none to all; every perturbed image of every curve
    goes through the model in batches of `batch_size`. `curves` (`metric=` is its old name):
    - "deletion": most important first, the target's score; lower AUC is better.
    - "insertion": the most important patches revealed on the baseline; higher is better.
    - "perturbation": "pos_perturbation" (most important removed first) and
      "neg_perturbation" (least important first), measured as top-1 accuracy on the target
      class (per image: 1 while its top class is still the target); lower / higher is better.
      For a target that is not a class they use the raw score, and then coincide with deletion
      and (mirrored) insertion.
    score: "prob" (softmax probability of the target class; the default for class targets,
    as in RISE) or "raw" (the target's own score, e.g. the logit; the default for LogitDiff,
    ImageTextScore and functions).
    Returns values [batch, metric] (area under each curve over the fraction of patches
    removed, `np.trapezoid`); `part("curves")` [batch, metric, step] with the fractions in
    `coords["step"]`; `meta["better"]` says which way is better.
    (The previous order, `faithfulness(model, images, maps, target)`, works for one release.)
    """
    target, maps = _old_order(target, old_target, maps)
    if metric is not None:
        from .._deprecated import warn

        warn("faithfulness(metric=...)", "faithfulness(curves=...)")
        curves = metric
    check_batch(images, "faithfulness")
    _metric_names(curves)
    if maps is None:
        raise InputError("faithfulness: give the attribution maps to score, maps=... (an AnalysisResult on the "
                         "grid, or a tensor [batch, rows, cols])")
    backend = Backend.of(model)
    check_images(images, backend.cfg)  # the images first: a map of the wrong size may follow from them
    layout = layout_for(backend, images)
    flat = as_patch_map(maps, layout, images.shape[0]).to(images.device)
    target = bind(backend, images, target)
    names, auc, curve_values, x, prob = score_maps(backend, images, [flat], target, curves, n_steps, baseline,
                                                   score, batch_size, progress)
    meta = {"better": {m: BETTER[m] for m in names}, "score": "prob" if prob else "raw",
            "target": target.describe(), "baseline": baseline if isinstance(baseline, str) else "tensor",
            "backend": backend.kind}
    coords = {"metric": names}
    curves_result = AnalysisResult("faithfulness/curves", curve_values[0], ("batch", "metric", "step"), layout,
                                   backend.class_names, {**coords, "step": x.tolist()}, meta)
    return AnalysisResult("faithfulness", auc[0], ("batch", "metric"), layout, backend.class_names, coords, meta,
                          {"curves": curves_result})


def _is_map(value: Any) -> bool:
    """An attribution map where a target was expected (the previous argument order)."""
    return isinstance(value, AnalysisResult) or (isinstance(value, Tensor) and value.is_floating_point()
                                                 and value.ndim >= 2)


def _old_order(target: Any, old_target: tuple, maps: Any) -> tuple[Any, Any]:
    """(target, maps) from the current order, or from the previous one (maps third) with a warning."""
    if maps is None and _is_map(target):
        from .._deprecated import warn

        if len(old_target) > 1:
            raise InputError("faithfulness takes (model, images, target, maps=...)")
        warn("faithfulness(model, images, maps, target)", "faithfulness(model, images, target, maps=maps)")
        return (old_target[0] if old_target else None), target
    if old_target:
        raise InputError("faithfulness takes (model, images, target, maps=...): one positional argument after "
                         "the images")
    return target, maps
