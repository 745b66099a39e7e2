"""The six analysis calls the backend benches time on a ViT-S/16 (run as `python bench/NAME.py`,
so this imports as `vit_methods`): the same calls, measured on the TL against the nnsight backend
(bench_backends) and on a remote against a local trace (bench_remote)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

import prisma_ext as px

PATCHING = "activation_patching (resid_pre x 12 layers x 14 rows)"


def vit_methods(clean: Tensor, corrupted: Tensor) -> dict[str, Callable[[Any], Any]]:
    """name -> call(model) of lens, DLA, rollout, gradient attention, a resid_pre patching
    sweep of every layer over 14 position rows, and attribution patching (target: class 0)."""
    patch_kw = dict(sites=("resid_pre",), positions="rows", progress=False)
    return {
        "logit_lens": lambda m: px.logit_lens(m, clean),
        "direct_logit_attribution": lambda m: px.direct_logit_attribution(m, clean, 0),
        "attention_rollout": lambda m: px.attention_rollout(m, clean),
        "gradient_attention": lambda m: px.gradient_attention(m, clean, 0),
        PATCHING: lambda m: px.activation_patching(m, clean, corrupted, 0, **patch_kw),
        "attribution_patching": lambda m: px.attribution_patching(m, clean, corrupted, 0, sites=("resid_pre",)),
    }
