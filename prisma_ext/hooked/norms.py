"""Hooked norms: LayerNorm and RMSNorm over the last axis, with TL's `hook_scale` and
`hook_normalized` sites."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


def is_hooked(*points: HookPoint) -> bool:
    """Whether any forward or backward hook (TL's or plain torch's) sits on these points."""
    return any(p._forward_hooks or p._backward_hooks or p._backward_pre_hooks
               or p._forward_pre_hooks for p in points)


@dataclass(frozen=True)
class NormSpec:
    """Which norm: "layernorm" or "rmsnorm", its eps, and whether it keeps its weight (and bias);
    `affine=False` is TL's LNPre / RMSPre (the weights folded into what reads it)."""

    kind: str = "layernorm"
    eps: float = 1e-6
    affine: bool = True


class LayerNorm(nn.Module):
    """LayerNorm (or, with `center=False`, RMSNorm) over the last axis; `affine=False` is TL's
    LNPre / RMSPre. An RMSNorm has a weight and no bias.

    Sites: `hook_scale` [..., 1] (sqrt(var + eps), or sqrt(mean square + eps)) and
    `hook_normalized` [..., d] (the output).
    """

    def __init__(self, d: int, eps: float, affine: bool = True, center: bool = True):
        super().__init__()
        self.eps, self.center = eps, center
        self.w = nn.Parameter(torch.ones(d)) if affine else None
        self.b = nn.Parameter(torch.zeros(d)) if affine and center else None
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        if not is_hooked(self.hook_scale, self.hook_normalized):
            if self.center:
                return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
            return F.rms_norm(x, x.shape[-1:], self.w, self.eps)
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = x / scale
        if self.w is not None:
            x = x * self.w
        if self.b is not None:
            x = x + self.b
        return self.hook_normalized(x)


def make_norm(spec: NormSpec, d: int) -> LayerNorm:
    return LayerNorm(d, spec.eps, spec.affine, center=spec.kind != "rmsnorm")
