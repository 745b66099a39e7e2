"""Which latents detect labelled concepts (a shape, a colour): AUROC of each latent's per-image
score, the latent picked on one set of images and scored on another.

    found = concept_detectors(model, sae, site, select_images, select_labels, eval_images, eval_labels)
    found["red"]  # {"latent": 17, "pooling": "max", "auroc": 0.998, "selection_auroc": 0.999}

A latent's per-image score is its largest activation over the image's tokens ("max"), its mean
over them ("mean"), or its activation on the CLS token ("cls"); the pair (latent, pooling) with the best AUROC on the
selection images is the concept's detector, and its AUROC on the evaluation images (other
images) is the one reported, so picking the best of many latents does not inflate it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .dictionary import SparseAutoencoder

POOLINGS = ("max", "mean", "cls")


def auroc(scores: Tensor, positive: Tensor) -> Tensor:
    """The area under the ROC curve of each column of `scores` [n, m] for the labels `positive`
    [n] (bool): P(score of a positive > score of a negative), ties counting 1/2. [m]"""
    positive = positive.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"auroc needs positives and negatives; got {n_pos} and {n_neg}")
    neg = scores[~positive].T.contiguous().sort(-1).values  # [m, n_neg]
    pos = scores[positive].T.contiguous()  # [m, n_pos]
    below = torch.searchsorted(neg, pos, right=False)
    at_or_below = torch.searchsorted(neg, pos, right=True)
    return ((below + at_or_below).double() / 2).sum(-1).div(n_pos * n_neg).float()


def pooled_scores(model: Any, sae: SparseAutoencoder, site: str, images: Tensor,
                  batch_size: int = 64) -> dict[str, Tensor]:
    """Every latent's per-image score under each pooling: {pooling: [n_images, d_sae]}."""
    from ..analysis.backend import Backend
    from .explain import _site_values

    backend = Backend.of(model)
    if not backend.layout.n_cls:
        raise InputError("pooled_scores: the 'cls' pooling needs a CLS token, and this model has none")
    out: dict[str, list[Tensor]] = {p: [] for p in POOLINGS}
    with torch.no_grad():
        for acts in _site_values(backend, site, images, batch_size):
            z = sae.encode(acts.float())
            out["max"].append(z.amax(1))
            out["mean"].append(z.mean(1))
            out["cls"].append(z[:, 0])
    return {p: torch.cat(v) for p, v in out.items()}


def concept_detectors(model: Any, sae: SparseAutoencoder, site: str, select_images: Tensor,
                      select_labels: Mapping[str, Tensor], eval_images: Tensor,
                      eval_labels: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """For each concept (labels: {name: bool [n_images]}), the latent and pooling that detect it
    best on the selection images and its AUROC on the evaluation images (module docstring)."""
    if set(select_labels) != set(eval_labels):
        raise InputError("concept_detectors: the selection and evaluation labels name different concepts")
    select = pooled_scores(model, sae, site, select_images)
    evaluate = pooled_scores(model, sae, site, eval_images)
    found = {}
    for name, labels in select_labels.items():
        best = max(((float(a), pooling, int(latent)) for pooling in POOLINGS
                    for latent, a in enumerate(auroc(select[pooling], labels))), key=lambda t: t[0])
        score, pooling, latent = best
        held = float(auroc(evaluate[pooling][:, latent:latent + 1], eval_labels[name])[0])
        found[name] = {"latent": latent, "pooling": pooling, "auroc": held, "selection_auroc": score}
    return found
