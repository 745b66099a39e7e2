"""Adapter for Hugging Face `LlavaForConditionalGeneration` with a CLIP or SigLIP vision tower:
traced on the nnsight backend only (`prisma_ext.traced.llava.TracedLlava`).

There is no TL conversion: the model is a vision tower feeding a language model through an MLP
projector, and the TL backend converts vision towers and CLIPs. `config` is the vision tower's
`ViTConfig` (token layout, widths, normalisation), as its own adapter gives it; the site map is
`prisma_ext.sitemaps.hf_llava`'s.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..hooked.config import ViTConfig
from .hf_common import TransformersAdapter

TL_REFUSAL = ("Hugging Face {kind} is traced on the nnsight backend only: the TL backend has no conversion "
              "of a LLaVA model (a vision tower feeding a language model through an MLP projector). Load it with "
              "px.load(..., backend='nnsight'); its vision tower alone converts to a HookedViT "
              "(px.load(llava.model.vision_tower) for a CLIP tower)")


def tower_of(model: nn.Module) -> nn.Module:
    return model.model.vision_tower


def tower_config(tower: nn.Module) -> ViTConfig:
    """The vision tower's `ViTConfig`, as its own adapter describes it (a SigLIP tower built
    without its attention-pool head: the same, pooled by the mean; LLaVA reads tokens, not a pool)."""
    kind = type(tower).__name__
    if kind == "CLIPVisionModel":
        from .hf_clip import HFCLIPAdapter

        return HFCLIPAdapter().config(tower)
    if kind == "SiglipVisionModel":
        from .hf_siglip import HFSiglipAdapter, SiglipTower

        if getattr(tower, "head", None) is not None:
            return HFSiglipAdapter().config(tower)
        return SiglipTower().vision_config(tower, tower, global_pool="avg")
    from ..sitemaps.hf_llava import TOWER_CLASSES

    raise UnsupportedModelError(f"a LLaVA vision tower of class {kind} is not supported; supported: "
                                f"{', '.join(TOWER_CLASSES)}")


class HFLlavaAdapter(TransformersAdapter):
    """transformers `LlavaForConditionalGeneration` (CLIP / SigLIP tower) -> `TracedLlava`."""

    name = "hf-llava"
    classes = ("LlavaForConditionalGeneration",)
    family = "Llava"
    model_types = {"llava": "LlavaForConditionalGeneration"}
    traced_class = "prisma_ext.traced.llava:TracedLlava"

    def check(self, model: nn.Module) -> None:
        """The TL backend: refused by name (`to_hooked` runs this first)."""
        raise UnsupportedModelError(TL_REFUSAL.format(kind=type(model).__name__))

    def check_traced(self, model: nn.Module) -> None:
        from ..sitemaps.hf_llava import projector_input

        tower = tower_of(model)
        if type(tower).__name__ == "SiglipVisionModel":
            from .hf_siglip import SiglipTower

            SiglipTower().check_vision(tower, tower, pooled=False)
        tower_config(tower)
        projector_input(model)
        if getattr(model.config, "image_token_id", None) is None:
            raise UnsupportedModelError(f"{type(model).__name__}: its config names no image_token_id "
                                        "(image_token_index)")

    def config(self, model: nn.Module) -> ViTConfig:
        """The vision tower's config (`source`: where the LLaVA came from)."""
        from .hf_siglip import source_of

        return tower_config(tower_of(model)).replace(source=source_of(model, "LLaVA"))

    def weights(self, model: nn.Module):
        raise UnsupportedModelError(TL_REFUSAL.format(kind=type(model).__name__))

    def site_map(self, model: nn.Module) -> dict:
        """The tower's sites (`visual.`), the projector's, the language model's (`lm.`)
        (`prisma_ext.sitemaps.hf_llava`)."""
        from ..sitemaps.hf_llava import hf_llava_sites

        return hf_llava_sites(model)


ADAPTERS = [HFLlavaAdapter()]
