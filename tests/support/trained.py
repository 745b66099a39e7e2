"""The trained model the faithfulness and attribution-patching tests use: `builtin:shapes-vit`
(the shipped timm ViT trained by `prisma_ext.zoo.train`) with held-out scenes."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor, nn

MIN_ACCURACY = 0.8  # chance is 1 / 6


class Trained(NamedTuple):
    model: nn.Module  # timm VisionTransformer in eval mode; class i is its class_names[i]
    images: Tensor  # held-out scenes, normalised for the model [n, 3, 64, 64]
    labels: Tensor  # [n]
    masks: Tensor  # [n, 64, 64] bool: the object's pixels
    accuracy: float  # on these scenes


@functools.cache
def trained_shapes_vit(n_test: int = 256) -> Trained:
    """builtin:shapes-vit and `n_test` held-out scenes (its held-out seed), with its accuracy on
    them (asserted >= MIN_ACCURACY)."""
    from prisma_ext import zoo

    model = zoo.build("shapes-vit")
    scenes = zoo.heldout("shapes-vit", n=n_test)
    images = zoo.normalize(scenes.images, "shapes-vit")
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == scenes.labels).float().mean().item()
    assert accuracy >= MIN_ACCURACY, f"builtin:shapes-vit reached only {accuracy:.2f} on held-out scenes"
    return Trained(model, images, scenes.labels, scenes.masks, accuracy)
