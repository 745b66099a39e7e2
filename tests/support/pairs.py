"""Shared set-up for the analysis tests: each small timm layout on both backends (cached)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

import prisma_ext as px
from tests.support.models import images_for, small_timm

# layouts with a linear readout: CLS, CLS + distillation, CLS + registers, average pool (norm on
# every token / on the pooled vector), CLIP-style pre-norm
LINEAR = ["plain", "deit_distilled", "dinov2_reg4", "gap_no_cls", "avg_fc_norm", "clip_norm_pre"]
PREFIX = ["deit_distilled", "dinov2_reg4", "gap_no_cls"]  # the layouts the issue names
SAME = dict(atol=1e-5, rtol=1e-5)  # both backends


class Pair(NamedTuple):
    src: torch.nn.Module
    tl: object  # HookedViT
    nn: object  # TracedViT
    images: torch.Tensor
    logits: torch.Tensor


@functools.cache
def pair(variant: str, batch: int = 3) -> Pair:
    src = small_timm(variant, seed=5)
    images = images_for(src, batch=batch, seed=6)
    with torch.no_grad():
        logits = src(images)
    return Pair(src, px.load(src), px.load(src, backend="nnsight"), images, logits)


def classes_for(p: Pair) -> torch.Tensor:
    """One class per image, not the predicted one (so a wrong default would show)."""
    return (p.logits.argmin(-1) + 1) % p.logits.shape[-1]
