"""What an adapter is: it recognises a source model and turns it into canonical ViT weights."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from ..hooked.config import ViTConfig
from ..hooked.weights import ViTWeights


class Adapter:
    """Base class for adapters. A subclass sets `name` and implements `matches`, `config` and
    `weights`; `check` may refuse unsupported variants with an `UnsupportedModelError` that names
    the missing feature. `to_hooked` is the whole conversion. For the nnsight backend an adapter
    also implements `site_map` (optional: without it only the TL backend takes its models).
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

    def site_map(self, module: nn.Module) -> dict:
        """TL site name -> `prisma_ext.traced.sites.Site` (submodule path, port, view), in forward
        order, for the nnsight backend. Optional; the default refuses."""
        raise UnsupportedModelError(
            f"adapter {self.name!r} has no site map, so the nnsight backend cannot trace "
            f"{type(module).__name__}; the TL backend (backend='tl') can")

    def to_traced(self, module: nn.Module, **options: Any):
        """Wrap the original `module` for nnsight (no weight conversion); `options`: device, dtype
        (they move the module itself)."""
        from ..traced.model import TracedViT

        return TracedViT(module, adapter=self, **options)


def norm_params(norm: nn.Module) -> tuple | None:
    """(weight, bias) of a LayerNorm-like module, None for an identity."""
    if isinstance(norm, nn.Identity):
        return None
    w = norm.weight
    b = norm.bias if norm.bias is not None else w.new_zeros(w.shape)
    return (w, b)
