"""Zero-shot segmentation from CLIP's per-token decomposition (Gandelsman, Efros & Steinhardt,
ICLR 2024): each patch's direct contribution to the image-text score, and how well thresholded
patch maps match exact object masks.

Threshold rule (`segmentation_scores`): a patch is foreground when its score is above the mean
score of its image's patches. Patch maps are upsampled to pixels nearest-neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .clip_decomposition import clip_decomposition, decomposition_scores
from .common import check_batch
from .result import AnalysisResult

THRESHOLD_RULE = "a patch is foreground when its score is above its image's mean patch score"


def _labels(labels: Any, n_images: int, n_texts: int, method: str) -> Tensor:
    """Text indices [n_images] (long) from a tensor or list of ints; checks length and range."""
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu()
    else:
        try:
            labels = torch.as_tensor(list(labels))
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"{method}: labels must be integer indices, got {labels!r}") from err
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InputError(f"{method}: labels must be a 1-d tensor or list of integer indices, got "
                         f"dtype {labels.dtype} and shape {tuple(labels.shape)}")
    if labels.shape[0] != n_images:
        raise InputError(f"{method}: {labels.shape[0]} labels for {n_images} images; give one per image")
    if n_images and (labels.min() < 0 or labels.max() >= n_texts):
        raise InputError(f"{method}: labels must index the {n_texts} texts (0..{n_texts - 1}), "
                         f"got values {int(labels.min())}..{int(labels.max())}")
    return labels.long()


def zero_shot_segmentation(clip: Any, images: Tensor, texts: Sequence[str], labels: Any = None, *,
                           batch_size: int | None = None) -> AnalysisResult:
    """Per-patch maps of each image's score with each text, from `clip_decomposition`'s
    per-token parts: map[b, t, p] = sum over layers and heads of the cosine score of what every
    head writes into the embedding by reading patch p (`decomposition_scores` on the "token"
    part). The prefix (CLS) token's own share is left off the grid.

    `texts`: prompts or class names (embedded as given). Returns values [batch, text, patch];
    with `labels` (one text index per image) values [batch, patch], each image's map for its
    own text. `meta["score"]` [batch, text] is the full cosine score.
    """
    method = "zero_shot_segmentation"
    check_batch(images, method)
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, Sequence) and len(texts) == 0:
        raise InputError(f"{method}: the text bank is empty; give at least one text or class name")
    picks = _labels(labels, images.shape[0], len(texts), method) if labels is not None else None
    decomposition = clip_decomposition(clip, images, batch_size=batch_size)
    scores = decomposition_scores(decomposition, clip, texts).part("token")  # [b, layer, head, token, text]
    lay = scores.layout
    per_token = scores.values.sum((1, 2)).transpose(1, 2)  # [batch, text, token]
    maps = per_token[..., lay.n_prefix: lay.n_prefix + lay.n_patches]
    meta = {"score": scores.meta["score"], "texts": list(texts), "backend": scores.meta["backend"]}
    if picks is None:
        return AnalysisResult(method, maps, ("batch", "text", "patch"), lay, None, {"text": list(texts)}, meta)
    own = maps[torch.arange(maps.shape[0]), picks.to(maps.device)]
    return AnalysisResult(method, own, ("batch", "patch"), lay, None, {}, {**meta, "labels": picks})


# ---------------------------------------------------------------------- scoring against masks
@dataclass(frozen=True)
class SegmentationScores:
    """Thresholded maps against exact masks. `miou`: the mean over the two classes (background,
    foreground) of each class's IoU over all pixels of all images; `pixel_accuracy`: the share
    of pixels labelled right; `foreground_iou`: the foreground class's IoU; `per_image` [batch]:
    each image's foreground IoU."""

    miou: float
    pixel_accuracy: float
    foreground_iou: float
    per_image: Tensor
    rule: str = THRESHOLD_RULE


def patch_grid(maps: AnalysisResult | Tensor, method: str = "segmentation_scores") -> Tensor:
    """Maps as a float grid [batch, rows, cols]: an AnalysisResult with axes (batch, patch) or
    (batch, token), or a tensor already on the grid."""
    if isinstance(maps, AnalysisResult):
        if "text" in maps.dims:
            raise InputError(f"{method}: the maps have a text axis {maps.dims}; pick one text per image "
                             "(zero_shot_segmentation(..., labels=...)) or select(text=i)")
        grid = maps.grid()
    elif isinstance(maps, Tensor):
        grid = maps
    else:
        raise InputError(f"{method}: expected maps as an AnalysisResult or a tensor [batch, rows, cols], "
                         f"got {type(maps).__name__}")
    if grid.ndim != 3:
        raise InputError(f"{method}: expected maps [batch, rows, cols], got shape {tuple(grid.shape)}")
    return grid.detach().float()


def threshold(grid: Tensor) -> Tensor:
    """Foreground patches [batch, rows, cols] (bool): score above the image's mean patch score."""
    return grid > grid.mean((1, 2), keepdim=True)


def upsample(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A patch mask [batch, rows, cols] (bool) -> pixels [batch, H, W], nearest-neighbour."""
    rows, cols = mask.shape[1:]
    if size[0] % rows or size[1] % cols:
        raise InputError(f"segmentation_scores: masks of {size[0]}x{size[1]} pixels do not tile a "
                         f"{rows}x{cols} patch grid")
    return mask.repeat_interleave(size[0] // rows, 1).repeat_interleave(size[1] // cols, 2)


def segmentation_scores(maps: AnalysisResult | Tensor, masks: Tensor) -> SegmentationScores:
    """mIoU and pixel accuracy of patch maps against exact masks [batch, H, W] (bool), with the
    threshold rule `THRESHOLD_RULE` and nearest-neighbour upsampling to pixels."""
    method = "segmentation_scores"
    grid = patch_grid(maps, method)
    if not isinstance(masks, Tensor) or masks.ndim != 3:
        got = f"shape {tuple(masks.shape)}" if isinstance(masks, Tensor) else type(masks).__name__
        raise InputError(f"{method}: expected masks [batch, height, width], got {got}")
    if masks.shape[0] != grid.shape[0]:
        raise InputError(f"{method}: {masks.shape[0]} masks for {grid.shape[0]} maps; give one per image")
    if grid.shape[0] == 0:
        raise InputError(f"{method}: no maps to score")
    truth = masks.to(device=grid.device).bool()
    pred = upsample(threshold(grid), tuple(truth.shape[1:]))
    inter_fg = (pred & truth).sum((1, 2)).float()
    union_fg = (pred | truth).sum((1, 2)).float()
    inter_bg = (~pred & ~truth).sum().float()
    union_bg = (~pred | ~truth).sum().float()
    fg = float(inter_fg.sum() / union_fg.sum().clamp(min=1))
    bg = float(inter_bg / union_bg.clamp(min=1))
    per_image = inter_fg / union_fg.clamp(min=1)
    accuracy = float((pred == truth).float().mean())
    return SegmentationScores((fg + bg) / 2, accuracy, fg, per_image.cpu())


def random_maps(n: int, grid: tuple[int, int], seed: int = 0) -> Tensor:
    """A seeded random baseline [n, rows, cols], uniform in [0, 1)."""
    return torch.rand(n, *grid, generator=torch.Generator().manual_seed(seed))
