"""Checks on the images a HookedViT is given: clear errors instead of shape soup."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..errors import InputError
from .config import ViTConfig


def check_images(images: Tensor, cfg: ViTConfig) -> None:
    """Raise InputError unless `images` is a finite float tensor [batch, in_chans, H, W] of a size
    the model takes (its own size, or any multiple of the patch size when it resizes positions)."""
    if not isinstance(images, Tensor):
        raise InputError(f"expected images as a torch.Tensor [batch, {cfg.in_chans}, H, W], "
                         f"got {type(images).__name__}")
    if not images.is_floating_point():
        raise InputError(f"expected floating-point images (normalised, e.g. model.preprocess(img)), "
                         f"got dtype {images.dtype}")
    if images.dtype != cfg.dtype:
        raise InputError(f"images are {images.dtype} and the model {cfg.dtype}: convert them, "
                         f"images.to({cfg.dtype})")
    if images.is_meta:
        raise InputError("images are on the meta device (no values): pass real images")
    if images.ndim != 4:
        hint = " (add a batch axis: images[None])" if images.ndim == 3 else ""
        raise InputError(f"expected images of shape [batch, {cfg.in_chans}, H, W], got "
                         f"{tuple(images.shape)}{hint}")
    channels, height, width = images.shape[1:]
    if channels != cfg.in_chans:
        hint = " (channels last? use images.permute(0, 3, 1, 2))" if width == cfg.in_chans else ""
        raise InputError(f"expected {cfg.in_chans} channels, got {channels} in shape "
                         f"{tuple(images.shape)}{hint}")
    ph, pw = cfg.patch_size
    if cfg.dynamic_img_size:
        if height % ph or width % pw:
            raise InputError(f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}")
    elif (height, width) != tuple(cfg.img_size):
        raise InputError(
            f"expected images of {cfg.img_size[0]}x{cfg.img_size[1]} (this model's fixed size), got "
            f"{height}x{width}; resize them, or load the model with img_size={height} (timm "
            f"resamples the position embeddings) or dynamic_img_size=True")
    if images.shape[0] == 0:
        raise InputError(f"got an empty batch of images {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise InputError("images contain NaN or infinite values")
    if images.min() >= 0 and images.max() > 10:
        warnings.warn(f"images range over [0, {float(images.max()):.0f}]: they look like 0-255 pixel values, "
                      "not normalised ones; the model expects what model.preprocess(image) gives",
                      UserWarning, stacklevel=3)
