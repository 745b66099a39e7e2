"""What an adapter is: it recognises a source model and turns it into canonical ViT weights."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..hooked.config import ViTConfig
from ..hooked.weights import ViTWeights


class Adapter:
    """Base class for adapters. A subclass sets `name` and implements `matches`, `config` and
    `weights`; `check` may refuse unsupported variants with an `UnsupportedModelError` that names
    the missing feature. `to_hooked` is the whole conversion.
    """

    name: str = "adapter"

    def matches(self, module: nn.Module) -> bool:
        """Whether this adapter is the one for `module` (cheap: no heavy imports)."""
        raise NotImplementedError

    def check(self, module: nn.Module) -> None:
        """Raise UnsupportedModelError if `module` uses a feature the HookedViT lacks."""

    def config(self, module: nn.Module) -> ViTConfig:
        raise NotImplementedError

    def weights(self, module: nn.Module) -> ViTWeights:
        raise NotImplementedError

    def class_names(self, module: nn.Module) -> list[str] | None:
        return None

    def to_hooked(self, module: nn.Module, **options: Any):
        """Convert `module`; `options` are ViTConfig fields (fold_ln, use_attn_result, ...)."""
        from ..hooked.vit import HookedViT

        self.check(module)
        cfg = self.config(module).replace(**options)
        return HookedViT.from_weights(cfg, self.weights(module), self.class_names(module))


def norm_params(norm: nn.Module) -> tuple | None:
    """(weight, bias) of a LayerNorm-like module, None for an identity."""
    if isinstance(norm, nn.Identity):
        return None
    w = norm.weight
    b = norm.bias if norm.bias is not None else w.new_zeros(w.shape)
    return (w, b)
