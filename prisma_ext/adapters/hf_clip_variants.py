"""Adapters for the Hugging Face relatives of CLIP with CLIP's layout: `MetaClip2Model` (-> HookedCLIP),
`MetaClip2VisionModel` (-> HookedViT, output `pooler_output`), `MetaClip2VisionModelWithProjection` and
`CLIPVisionModelWithProjection` (-> HookedViT whose output is `image_embeds`, the projection
`d_proj`), and the refusal, by name, of the text towers alone.

MetaCLIP 2's modules are CLIP's, name for name (`hf_clip`); its text tower always pools at the
first `eos_token_id` (no legacy argmax rule) and its tokenizer is the XLM-R one saved with the
model. A text tower alone (`CLIPTextModel`, `SiglipTextModel`, ...) has no image input, and px.load
converts image models and image-text pairs (a `HookedTextTransformer` is built only as
`HookedCLIP.text`): those classes match here only to be refused, naming the pair to load.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..hooked.config import TextConfig
from .hf_clip import HFCLIPAdapter
from .hf_common import TransformersAdapter, is_transformers
from .hf_siglip import hf_act, hf_tokenizer_auto

# a text tower alone -> the pair it is converted in
TEXT_TOWERS = {"CLIPTextModel": "CLIPModel", "CLIPTextModelWithProjection": "CLIPModel",
               "SiglipTextModel": "SiglipModel", "Siglip2TextModel": "Siglip2Model",
               "MetaClip2TextModel": "MetaClip2Model", "MetaClip2TextModelWithProjection": "MetaClip2Model"}


class HFTextTowerRefusal(TransformersAdapter):
    """Matches the text towers alone (`TEXT_TOWERS`) only to refuse each by name in `check`, naming
    the pair to load instead (a generic refusal would only list the supported classes)."""

    name = "hf-text-towers"
    refused = TEXT_TOWERS

    def matches(self, module: nn.Module) -> bool:
        return is_transformers(module) and type(module).__name__ in self.refused

    def check(self, module: nn.Module) -> None:
        kind = type(module).__name__
        raise UnsupportedModelError(
            f"Hugging Face {kind}: a text tower alone is not supported (px.load converts image models and "
            f"image-text pairs; load the {self.refused[kind]} it belongs to and use its .text tower)")


class HFCLIPProjectionAdapter(HFCLIPAdapter):
    """transformers `CLIPVisionModelWithProjection` -> HookedViT whose output is `image_embeds`
    (the normalised class token through `visual_projection`; `d_proj` set, `hook_image_embed`)."""

    name = "hf-clip-projection"
    classes = ("CLIPVisionModelWithProjection",)
    model_types = {}

    def reference_output(self, model: nn.Module, images: Tensor) -> Tensor:
        return model(pixel_values=images).image_embeds


class HFMetaClip2Adapter(HFCLIPProjectionAdapter):
    """transformers `MetaClip2Model` -> HookedCLIP, `MetaClip2VisionModel` -> HookedViT (output
    `pooler_output`), `MetaClip2VisionModelWithProjection` -> HookedViT (output `image_embeds`)."""

    name = "hf-metaclip2"
    classes = ("MetaClip2Model", "MetaClip2VisionModel", "MetaClip2VisionModelWithProjection")
    model_types = {"metaclip_2": "MetaClip2Model", "metaclip_2_vision_model": "MetaClip2VisionModel"}

    def check(self, model: nn.Module) -> None:
        kind = type(model).__name__
        hf_act(self._vision(model).config, kind)
        if hasattr(model, "text_model"):
            cfg = model.text_model.config
            hf_act(cfg, f"{kind}'s text tower")
            if not isinstance(cfg.eos_token_id, int):
                raise UnsupportedModelError(f"Hugging Face {kind}: eos_token_id={cfg.eos_token_id!r} (several "
                                            "end-of-text ids) is not supported")

    def config(self, model: nn.Module):
        return super().config(model).replace(source=getattr(
            model, "_prisma_source", f"hf:{getattr(model, 'name_or_path', '') or 'MetaCLIP 2'}"))

    def text_config(self, model: nn.Module) -> TextConfig:
        return super().text_config(model).replace(pool="eos")  # the first eos_token_id, whatever its value

    def tokenizer(self, model: nn.Module):
        return hf_tokenizer_auto(model, model.text_model.config.max_position_embeddings)

    def reference_output(self, model: nn.Module, images: Tensor) -> Tensor:
        out = model(pixel_values=images)
        return out.image_embeds if hasattr(model, "visual_projection") else out.pooler_output


ADAPTERS = [HFCLIPProjectionAdapter(), HFMetaClip2Adapter(), HFTextTowerRefusal()]
