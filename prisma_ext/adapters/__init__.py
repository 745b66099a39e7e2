"""Adapters turn source models (timm, open_clip, Hugging Face, or your own) into hooked models.

`base` is the contract (`Adapter`, `CLIPAdapter`), `registry` finds the adapter of a module (user
adapters first), and one module per source family implements it: `timm_vit`, `open_clip`,
`hf_clip`, `hf_vit` (`hf_common` is what the Hugging Face ones share, `tokenizers` the CLIP prompt
tokenizers). Site maps for the nnsight backend are in `prisma_ext.sitemaps`.
"""

from .base import Adapter, CLIPAdapter, conv_patch_weight, norm_params
from .registry import adapter_for, list_adapters, register_adapter, unregister_adapter

__all__ = ["Adapter", "CLIPAdapter", "adapter_for", "conv_patch_weight", "list_adapters", "norm_params",
           "register_adapter", "unregister_adapter"]
