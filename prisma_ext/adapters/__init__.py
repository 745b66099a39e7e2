"""Adapters turn source models (timm, later open_clip and HF, or your own) into HookedViTs."""

from .base import Adapter, norm_params
from .registry import adapter_for, list_adapters, register_adapter, unregister_adapter

__all__ = ["Adapter", "norm_params", "adapter_for", "list_adapters", "register_adapter",
           "unregister_adapter"]
