"""Turning an image (array or PIL) into the tensor a model expects."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .errors import InputError


def to_model_input(image, cfg) -> Tensor:
    """HxWx3 uint8 array (or PIL image) -> [1, 3, H, W] float tensor, normalised with the
    model's mean/std: the shorter side is resized to img_size / crop_pct (bicubic), then the
    centre is cropped to img_size, as timm's evaluation transform does."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise InputError(f"expected an HxWx3 image array, got shape {image.shape}")
        if image.dtype != np.uint8:
            image = np.clip(image * (255 if image.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
        image = Image.fromarray(image[..., :3])
    elif not isinstance(image, Image.Image):
        raise InputError(f"expected a numpy array or PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    out_h, out_w = cfg.img_size
    ratio = 1.0 / (cfg.crop_pct or 1.0)
    w, h = image.size
    scale = max(out_h * ratio / h, out_w * ratio / w)
    new_w, new_h = max(out_w, round(w * scale)), max(out_h, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    image = image.crop((left, top, left + out_w, top + out_h))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return normalize_pixels(x, cfg).unsqueeze(0).to(cfg.dtype)


def normalize_pixels(x: Tensor, cfg) -> Tensor:
    """Pixels in [0, 1], [..., 3, H, W], normalised with the model's mean and std (float32)."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.std, dtype=torch.float32)[:, None, None]
    return (x.float() - mean) / std
