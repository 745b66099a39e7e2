"""Which order of a layer's neurons' effects matters (Gandelsman, Efros & Steinhardt, ICLR 2025,
the mean-ablation experiment): zero-shot accuracy when all of one layer's neurons have their
first-order effects, their second-order effects, or both replaced by their means over the
images (in the embedding, from `second_order_effects`), against mean-ablating the neurons in the
model itself (every later computation rerun).

The last comparison is the ablation check of the approximation: how much of the real change of
the embedding, when the neurons are set to their mean activation, the first- and second-order
effects of that change predict (`meta["predicted_cosine"]`, `meta["predicted_share"]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .clip_decomposition import clip_backend
from .common import check_batch, layout_for
from .head_ablation import _classifier
from .result import AnalysisResult
from .second_order import SECOND_ORDER_REMOTE, _check_layer, _Paths, _sites, linear_effects, pooled_weights
from .segmentation import _labels

VARIANTS = ("first_order", "second_order", "both", "model")


def _check_layers(layers: Any, n_layers: int, method: str) -> list[int]:
    if layers is None:
        return list(range(n_layers - 1))
    layers = [layers] if isinstance(layers, Integral) else list(layers)
    if not layers:
        raise InputError(f"{method}: layers is empty; give layer indices, or None for every layer but the last")
    return [_check_layer(layer, n_layers, method) for layer in layers]


def neuron_ablation(clip: Any, images: Tensor, labels: Any, class_names: Sequence[str] | None = None,
                    templates: Sequence | None = None, *, layers: Sequence[int] | None = None) -> AnalysisResult:
    """Zero-shot accuracy with each layer's MLP neurons mean-ablated, by effect order.

    For each layer in `layers` (default: all but the last, whose neurons have no second-order
    effect), values [layer, variant] hold the accuracy with every neuron of that layer
    - "first_order": its direct effect replaced by that effect's mean over `images`;
    - "second_order": its effect through the later attention layers replaced by its mean;
    - "both": both replaced (the embedding arithmetic of the first two, nothing recomputed);
    - "model": its activation (`mlp.hook_post`) replaced by its mean over the images at each
      token position in the model's own forward (everything after it recomputed).
    Classes as in `head_ablation`: `class_names` through `templates`, or the installed zero-shot
    head. meta: clean_accuracy; per layer "predicted_cosine" (mean over images of the cosine
    between the model's real embedding change under the "model" ablation and the change the
    first- plus second-order effects of that activation change predict) and "predicted_share"
    (the predicted change's norm over the real one's, mean over images).
    """
    method = "neuron_ablation"
    check_batch(images, method)
    backend = clip_backend(clip, method)
    backend.require_local(method, SECOND_ORDER_REMOTE)
    cfg = backend.cfg
    layers = _check_layers(layers, cfg.n_layers, method)
    classifier, class_bias, names = _classifier(clip, class_names, templates, method)
    picks = _labels(labels, images.shape[0], len(names), method)
    if images.shape[0] < 2:
        raise InputError(f"{method}: needs at least 2 images to take a mean over, got {images.shape[0]}")
    all_neurons = list(range(cfg.d_mlp))
    values = torch.zeros(len(layers), len(VARIANTS))
    cosines, shares = [], []
    with torch.no_grad():
        for row, layer in enumerate(layers):
            paths = _Paths(backend, layer, all_neurons)
            run = backend.run(images, read=_sites(layer, cfg.n_layers))
            site = f"blocks.{layer}.mlp.hook_post"
            act = run.acts[site]
            pooled = pooled_weights(backend, run.acts, paths.D)
            first, by_layer = linear_effects(backend, run.acts, act, paths, pooled)
            first, second = first.sum(1), by_layer.sum((1, 2))  # [batch, embed]
            embed = run.output.to(first)
            classes, bias = classifier.to(first), class_bias.to(first)

            def accuracy(e: Tensor, classes: Tensor = classes, bias: Tensor = bias) -> float:
                return float(((e @ classes.T + bias).argmax(-1).cpu() == picks).float().mean())

            shift_first, shift_second = first.mean(0) - first, second.mean(0) - second
            mean_act = act.mean(0, keepdim=True)
            ablated = backend.run(images, edit={site: lambda v, m=mean_act: m.expand_as(v).clone()}).output.to(first)
            values[row] = torch.tensor([accuracy(embed + shift_first), accuracy(embed + shift_second),
                                        accuracy(embed + shift_first + shift_second), accuracy(ablated)])
            p_first, p_layers = linear_effects(backend, run.acts, mean_act - act, paths, pooled)
            predicted, real = p_first.sum(1) + p_layers.sum((1, 2)), ablated - embed
            cosines.append(float(torch.nn.functional.cosine_similarity(predicted, real, dim=-1).mean()))
            shares.append(float((predicted.norm(dim=-1) / real.norm(dim=-1).clamp_min(1e-12)).mean()))
            clean = accuracy(embed)
    labels_ = [f"L{i}" for i in layers]
    meta = {"clean_accuracy": clean, "predicted_cosine": cosines, "predicted_share": shares, "layers": layers,
            "class_names": names, "n_images": int(images.shape[0]), "ablation": "mean over the images",
            "backend": backend.kind}
    return AnalysisResult(method, values, ("layer", "variant"), layout_for(backend, images), names,
                          {"layer": labels_, "variant": list(VARIANTS)}, meta)
