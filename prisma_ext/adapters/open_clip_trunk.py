"""open_clip's `TimmModel` visual tower: a timm trunk (VisionTransformer or Eva: SigLIP, SigLIP 2,
EVA-CLIP, Perception Encoder, ...) and open_clip's head after it.

The trunk converts with the timm adapters. The image embedding is the trunk's output, through
open_clip's head: a trunk built with `num_classes=embed_dim` ends in a Linear head that is the
image projection (EVA-CLIP, PE); a `proj="linear"` head is the projection; with `proj="none"`
(SigLIP) the pooled vector is the embedding itself, represented as an identity projection so that
every CLIP tower has `hook_image_embed`. An MLP projection and the 2-D attention pools are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..hooked.config import ViTConfig
from ..hooked.weights import ViTWeights
from .base import Adapter


def trunk_adapter(visual: nn.Module) -> Adapter:
    """The timm adapter for the trunk of an open_clip `TimmModel`, or a refusal naming it."""
    from .timm_eva import TimmEvaAdapter
    from .timm_vit import TimmViTAdapter

    trunk = visual.trunk
    for adapter in (TimmViTAdapter(), TimmEvaAdapter()):
        if adapter.matches(trunk):
            return adapter
    reason = TimmViTAdapter().refusal(trunk) or f"timm {type(trunk).__name__} is not a ViT"
    raise UnsupportedModelError(f"open_clip visual tower: its timm trunk is refused: {reason}")


def check_trunk(visual: nn.Module) -> None:
    adapter = trunk_adapter(visual)
    adapter.check(visual.trunk)
    extra = [name for name, _ in visual.head.named_children() if name not in ("drop", "proj")]
    if extra:
        feature = {"mlp": "an MLP image projection (proj='mlp')", "pool": "a 2-D attention pool (abs_attn/rot_attn)"}
        raise UnsupportedModelError(f"open_clip visual tower: {feature.get(extra[0], extra[0])} is not supported")
    trunk_head = visual.trunk.head
    if isinstance(trunk_head, nn.Linear) and hasattr(visual.head, "proj"):
        raise UnsupportedModelError("open_clip visual tower: a trunk head and a projection after it are not supported")
    if getattr(visual.trunk, "dist_token", None) is not None:
        raise UnsupportedModelError("open_clip visual tower: a distilled timm trunk is not supported")


def _projection(visual: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The image projection as (weight [d_proj, d_model], bias)."""
    trunk_head, proj = visual.trunk.head, getattr(visual.head, "proj", None)
    if isinstance(trunk_head, nn.Linear):
        return trunk_head.weight, trunk_head.bias
    if isinstance(proj, nn.Linear):
        return proj.weight, proj.bias
    d = visual.trunk.num_features
    weight = visual.trunk.patch_embed.proj.weight
    return torch.eye(d, dtype=weight.dtype, device=weight.device), None


def trunk_config(visual: nn.Module, **changes) -> ViTConfig:
    cfg = trunk_adapter(visual).config(visual.trunk)
    return cfg.replace(n_classes=0, d_proj=_projection(visual)[0].shape[0], **changes)


def trunk_weights(visual: nn.Module) -> ViTWeights:
    weights = trunk_adapter(visual).weights(visual.trunk)
    weights.proj_w, weights.proj_b = _projection(visual)
    weights.head_w = weights.head_b = None
    return weights


def trunk_sites(visual: nn.Module, prefix: str = "visual.", path: str = "visual") -> dict:
    """HookedCLIP's visual site names on the trunk's modules, with `hook_image_embed` where the
    embedding leaves the tower."""
    from ..sitemaps.spec import Site
    from ..sitemaps.timm import timm_vit_sites

    sites = timm_vit_sites(visual.trunk, prefix=prefix, path=f"{path}.trunk")
    sites[f"{prefix}hook_image_embed"] = Site(path, shape="[batch, d_proj]")
    return sites
