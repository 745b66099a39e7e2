"""The TransformerLens backend: hooked layers and HookedViT."""

from .config import ViTConfig
from .vit import HookedViT
from .weights import AttnPoolWeights, BlockWeights, ViTWeights

__all__ = ["HookedViT", "ViTConfig", "ViTWeights", "BlockWeights", "AttnPoolWeights"]
