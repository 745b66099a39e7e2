"""Mean-ablation of CLIP's attention heads through the embedding's decomposition (Gandelsman,
Efros & Steinhardt, ICLR 2024, fig. 2): replace a head's part of each image's embedding by its
mean over the images, rebuild the embedding from the parts and measure zero-shot accuracy.

The final norm's scale stays frozen at its clean value (as in `clip_decomposition`), so an
ablation changes the embedding only by the parts it replaces; nothing downstream is recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .clip_decomposition import clip_backend, clip_decomposition, total_of
from .common import check_batch
from .result import AnalysisResult
from .segmentation import _labels

OTHER_PARTS = ("attn_bias", "mlp", "embedding", "constant")


def mean_ablated(decomposition: AnalysisResult, heads: Tensor | None = None,
                 parts: Sequence[str] = ()) -> Tensor:
    """Image embeddings [batch, embed] rebuilt from a `clip_decomposition` with the heads marked
    in `heads` (bool [layer, head]; None: none) and the whole `parts` (names among OTHER_PARTS)
    replaced by their means over the batch. Every head and part ablated gives the mean embedding."""
    values = decomposition.values  # [batch, layer, head, embed]
    if heads is None:
        heads = torch.zeros(values.shape[1:3], dtype=torch.bool)
    heads = heads.to(values.device)
    if heads.shape != values.shape[1:3] or heads.dtype != torch.bool:
        raise InputError(f"mean_ablated: heads must be a bool mask [{values.shape[1]}, {values.shape[2]}] "
                         f"(layer, head), got {heads.dtype} {tuple(heads.shape)}")
    unknown = [p for p in parts if p not in OTHER_PARTS]
    if unknown:
        raise InputError(f"mean_ablated: unknown part {unknown[0]!r}; parts are {OTHER_PARTS}")
    keep = heads[None, :, :, None]
    embed = total_of(decomposition) + (torch.where(keep, values.mean(0, keepdim=True), values) - values).sum((1, 2))
    for name in parts:
        part = decomposition.part(name).values
        embed = embed + (part.mean(0, keepdim=True) - part).reshape(part.shape[0], -1, part.shape[-1]).sum(1)
    return embed


def _classifier(clip: Any, class_names: Sequence[str] | None, templates: Sequence | None,
                method: str, tower: Any = None) -> tuple[Tensor, Tensor, list[str]]:
    """Class text embeddings [n_classes, embed], a bias [n_classes] and the names:
    `clip.zero_shot_classifier` of the given classes (no bias), or (no classes given) the head
    the vision tower has installed (`use_zero_shot_head`; `tower`: the vision tower's HookedViT,
    by default `clip_backend(clip, method).vit`, which on a TracedCLIP carries its head)."""
    if class_names is None:
        if templates is not None:
            raise InputError(f"{method}: templates given without class_names")
        if tower is None:
            tower = clip_backend(clip, method).vit
        names = tower.class_names
        if not names or getattr(tower, "head", None) is None:
            raise InputError(f"{method}: give class_names (and templates), or install a zero-shot head first "
                             "(clip.use_zero_shot_head(...) or zoo.use_zero_shot_head(clip))")
        head = tower.head
        bias = head.bias.detach() if head.bias is not None else head.weight.new_zeros(head.weight.shape[0])
        return head.weight.detach(), bias, list(names)
    if isinstance(class_names, str) or not isinstance(class_names, Sequence) or not class_names:
        raise InputError(f"{method}: class_names must be a non-empty list of names, got {class_names!r}")
    classifier = clip.zero_shot_classifier(class_names, templates)
    return classifier, classifier.new_zeros(classifier.shape[0]), list(class_names)


def head_ablation(clip: Any, images: Tensor, labels: Any, class_names: Sequence[str] | None = None,
                  templates: Sequence | None = None, *, batch_size: int | None = None) -> AnalysisResult:
    """Zero-shot accuracy with attention heads mean-ablated (each head's part of the embedding
    replaced by its mean over `images`).

    `labels`: the class index of each image [batch]. Classes: `class_names` through `templates`
    (`clip.zero_shot_classifier`; its defaults for None), or with neither the vision tower's
    installed zero-shot head. Returns values [layer, head]: accuracy with that single head
    ablated; parts "layer" [layer]: with all of that layer's heads and its attention bias
    ablated; "from_layer" [layer]: with every layer's heads and biases from that layer onward
    ablated; "up_to_layer" [layer]: from layer 0 up to and including that layer (the paper's
    accumulated ablation). `meta["clean_accuracy"]`: nothing ablated, which equals the accuracy of
    `clip.visual` with the same zero-shot head (the embedding is rebuilt exactly).
    """
    method = "head_ablation"
    check_batch(images, method)
    tower = clip_backend(clip, method).vit
    classifier, class_bias, names = _classifier(clip, class_names, templates, method, tower)
    picks = _labels(labels, images.shape[0], len(names), method)
    decomposition = clip_decomposition(clip, images, tokens=False, batch_size=batch_size)
    classifier, class_bias = classifier.to(decomposition.values), class_bias.to(decomposition.values)
    n_layers, n_heads = decomposition.values.shape[1:3]
    # the logits are linear in the parts: score each part's change (mean - value) once
    heads, bias = decomposition.values, decomposition.part("attn_bias").values
    clean = total_of(decomposition) @ classifier.T + class_bias  # [batch, class]
    head_shift = (heads.mean(0, keepdim=True) - heads) @ classifier.T  # [batch, layer, head, class]
    bias_shift = (bias.mean(0, keepdim=True) - bias) @ classifier.T  # [batch, layer, class]

    def accuracy(mask: Tensor, layers: Tensor | None = None) -> float:
        logits = clean + (head_shift * mask.to(head_shift)[None, :, :, None]).sum((1, 2))
        if layers is not None:  # the attention biases of these layers too
            logits = logits + bias_shift[:, layers].sum(1)
        return float((logits.argmax(-1).cpu() == picks).float().mean())

    none = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    per_head = torch.zeros(n_layers, n_heads)
    for i in range(n_layers):
        for h in range(n_heads):
            mask = none.clone()
            mask[i, h] = True
            per_head[i, h] = accuracy(mask)
    per_layer, from_layer, up_to = (torch.zeros(n_layers) for _ in range(3))
    for i in range(n_layers):
        for out, layers in ((per_layer, [i]), (from_layer, range(i, n_layers)), (up_to, range(i + 1))):
            mask = none.clone()
            mask[list(layers)] = True
            out[i] = accuracy(mask, torch.tensor(list(layers)))

    layer_labels = [f"L{i}" for i in range(n_layers)]
    coords = {"layer": layer_labels, "head": [f"H{h}" for h in range(n_heads)]}
    meta = {"clean_accuracy": accuracy(none),
            "class_names": names, "n_images": images.shape[0], "ablation": "mean over the images",
            "frozen": "final norm scale", "max_error": decomposition.meta["max_error"]}
    lay = decomposition.layout

    def by_layer(name: str, values: Tensor) -> AnalysisResult:
        return AnalysisResult(f"{method}/{name}", values, ("layer",), lay, names, {"layer": layer_labels}, meta)

    return AnalysisResult(method, per_head, ("layer", "head"), lay, names, coords, meta,
                          {"layer": by_layer("layer", per_layer), "from_layer": by_layer("from_layer", from_layer),
                           "up_to_layer": by_layer("up_to_layer", up_to)})
