"""Hugging Face SigLIP and SigLIP 2: HookedCLIP's and HookedViT's site names on the transformers modules.

The layers are CLIP's (`self_attn.{q,k,v,out}_proj`, `layer_norm1/2`, `mlp.fc1/activation_fn`,
`sitemaps.hf`), in both towers. Image tower: `hook_patch_embed` is the patch embedding's output
(SigLIP's convolution, SigLIP 2's Linear over NaFlex patches; positions are added inline, so
neither `hook_embed` nor `hook_pos_embed`), `ln_final.hook_normalized` is `post_layernorm` on
every token, `hook_pooled` the attention-pool head's output; its insides (the probe's pattern,
`z`, the residual MLP) run inside `nn.MultiheadAttention` and inline, so no `attn_pool.*` site.
A `SiglipModel`'s `visual.hook_image_embed` is the image tower's `pooler_output` (where the
embedding leaves the tower; there is no projection module). Text tower: the token embedding, the
layers, `final_layer_norm`, and `head`'s input (the last position, `hook_pooled`) and output
(`hook_text_embed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .builder import POOLED, TOKENS, SiteMap
from .hf import CLIP_LAYER, _layers, hf_clip_text_sites
from .spec import IDENTITY, ConvTokens, Site, View


@dataclass(frozen=True)
class OutputField(View):
    """One field of a transformers output object (e.g. a `BaseModelOutputWithPooling`'s
    `pooler_output`); a write replaces that field."""

    name: str
    identity = False

    def read(self, raw: Any) -> Tensor:
        return getattr(raw, self.name)

    def write(self, value: Tensor, raw: Any) -> Any:
        setattr(raw, self.name, value)
        return raw


def _vision_trunk(sites: SiteMap, base: str, vision: nn.Module) -> None:
    """The patch embedding, the layers and `post_layernorm` of a SigLIP (2) image tower at `base`."""
    patch = vision.embeddings.patch_embedding
    view = ConvTokens() if isinstance(patch, nn.Conv2d) else IDENTITY
    sites.add("hook_patch_embed", Site(f"{base}embeddings.patch_embedding", view=view, shape=TOKENS))
    _layers(sites, f"{base}encoder.layers", vision.encoder.layers, CLIP_LAYER)
    sites.add("ln_final.hook_normalized", Site(f"{base}post_layernorm"))


def hf_siglip_vision_sites(model: nn.Module, prefix: str) -> dict[str, Site]:
    """A `SiglipModel`'s / `Siglip2Model`'s image tower (`vision_model`), or a vision model alone."""
    pair = hasattr(model, "vision_model")
    base = "vision_model." if pair else ""
    sites = SiteMap(prefix)
    _vision_trunk(sites, base, model.vision_model if pair else model)
    sites.add("hook_pooled", Site(f"{base}head", shape=POOLED))
    if pair:
        sites.add("hook_image_embed", Site("vision_model", view=OutputField("pooler_output"), shape="[batch, d_proj]"))
    return sites.done()


def hf_siglip_sites(model: nn.Module) -> dict[str, Site]:
    """`SiglipModel` / `Siglip2Model`: both towers, image first; a vision model: HookedViT's names."""
    if not hasattr(model, "text_model"):
        return hf_siglip_vision_sites(model, prefix="")
    return {**hf_siglip_vision_sites(model, prefix="visual."),
            **hf_clip_text_sites(model, projection="text_model.head")}


def hf_siglip_classifier_sites(model: nn.Module) -> dict[str, Site]:
    """`SiglipForImageClassification` / `Siglip2ForImageClassification`: HookedViT's names;
    `hook_pooled` is the classifier's input (the mean of `post_layernorm`'s tokens)."""
    sites = SiteMap()
    _vision_trunk(sites, "vision_model.", model.vision_model)
    sites.add("hook_pooled", Site("classifier", "input", shape=POOLED))
    return sites.done()
