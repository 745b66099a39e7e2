"""The nnsight backend's SigLIP (2) models: a `TracedCLIP` (both towers, or an image tower alone)
and a `TracedViT` (the classifiers) whose invokes pass images [batch, 3, H, W], like every other
traced model. For SigLIP 2 the one forward call the invokes make is handed NaFlex inputs
(`hf_siglip.naflex_inputs`: patches, a mask of ones, the grid shapes); rows stay images, so each
invoke keeps its own rows of every site. Imported only when a model is traced (it imports nnsight)."""

from __future__ import annotations

from typing import Any

from ..adapters.hf_siglip import _naflex, naflex_inputs
from .batching import images_of
from .clip import TracedCLIP
from .model import TracedViT


class TracedSiglip(TracedCLIP):
    """A traced `SiglipModel` / `SiglipVisionModel` (as is) or `Siglip2Model` / `Siglip2VisionModel`
    (images cut into NaFlex patches for the forward call)."""

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        args, kwargs = super()._batch(invokes, fn)
        module, key = self._module, self._inputs.image
        if not _naflex(module) or key is None:
            return args, kwargs
        named = self._inputs.bind(args, kwargs)
        if key not in named:
            return args, kwargs
        patch = getattr(module, "vision_model", module).config.patch_size
        named.update(naflex_inputs(named.pop(key), patch))
        return (), named


class TracedSiglipClassifier(TracedViT):
    """A traced `SiglipForImageClassification` (as is) or `Siglip2ForImageClassification` (images
    cut into NaFlex patches for the forward call)."""

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        args, kwargs = super()._batch(invokes, fn)
        images = images_of(args, kwargs)
        if not _naflex(self._module) or images is None:
            return args, kwargs
        rest = {k: v for k, v in kwargs.items() if k not in ("x", "images", "pixel_values")}
        return (), {**rest, **naflex_inputs(images, self._module.vision_model.config.patch_size)}
