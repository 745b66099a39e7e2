"""Hugging Face transformers: HookedCLIP's and HookedViT's site names on the transformers modules.

`CLIPModel` (towers prefixed `visual.`/`text.`), `CLIPVisionModel` and `ViTForImageClassification`
/ `ViTModel` (HookedViT's unprefixed names). q/k/v are the projections' outputs, `z` is the output
projection's input, `hook_attn_out` is item 0 of the attention's (out, weights) output; the
pattern switches that one attention module to `prisma_explicit` for the trace
(`sitemaps.attention.ExplicitHFAttention`).
"""

from __future__ import annotations

from torch import nn

from .attention import ExplicitHFAttention
from .builder import D_MLP, HEADS, PATTERN, POOLED, TOKENS, BlockSites, SiteMap
from .spec import ConvTokens, Heads, Site, TupleItem, Unsqueeze

# the submodule names of a pre-norm encoder layer: CLIPEncoderLayer, and transformers 5's ViTLayer
CLIP_LAYER = dict(attn="self_attn", ln1="layer_norm1", q="q_proj", k="k_proj", v="v_proj", o="out_proj",
                  ln2="layer_norm2", fc1="mlp.fc1", act="mlp.activation_fn", mlp="mlp", heads="num_heads")
VIT_LAYER = dict(CLIP_LAYER, attn="attention", ln1="layernorm_before", o="o_proj", ln2="layernorm_after",
                 heads="num_attention_heads")


def _layers(sites: SiteMap, path: str, layers: nn.ModuleList, names: dict) -> None:
    n = names
    for i, layer in enumerate(layers):
        p = f"{path}.{i}"
        heads = getattr(getattr(layer, n["attn"]), n["heads"])
        attn = f"{p}.{n['attn']}"
        q, k, v = (Site(f"{attn}.{n[x]}", view=Heads(heads), shape=HEADS) for x in "qkv")
        sites.block(i, BlockSites(
            resid_pre=Site(p, "input"), ln1=Site(f"{p}.{n['ln1']}"), q=q, k=k, v=v,
            pattern=Site(attn, "pattern", shape=PATTERN, prepare=ExplicitHFAttention(attn)),
            z=Site(f"{attn}.{n['o']}", "input", Heads(heads), HEADS),
            attn_out=Site(attn, view=TupleItem(0)),
            resid_mid=Site(f"{p}.{n['ln2']}", "input", in_place=True), ln2=Site(f"{p}.{n['ln2']}"),
            mlp_pre=Site(f"{p}.{n['fc1']}", shape=D_MLP), mlp_post=Site(f"{p}.{n['act']}", shape=D_MLP),
            mlp_out=Site(f"{p}.{n['mlp']}"), resid_post=Site(p, view=TupleItem(0))))


def hf_clip_vision_sites(model: nn.Module, prefix: str) -> dict[str, Site]:
    """`CLIPModel`'s image tower (`vision_model`, then `visual_projection`) or a `CLIPVisionModel`."""
    base = "vision_model." if hasattr(model, "vision_model") else ""
    vision = model.vision_model if base else model
    sites = SiteMap(prefix)
    sites.add("hook_patch_embed", Site(f"{base}embeddings.patch_embedding", view=ConvTokens(), shape=TOKENS))
    sites.add("hook_full_embed", Site(f"{base}pre_layrnorm", "input"))
    sites.add("ln_pre.hook_normalized", Site(f"{base}pre_layrnorm"))
    sites.add("hook_embed", Site(f"{base}pre_layrnorm"))
    _layers(sites, f"{base}encoder.layers", vision.encoder.layers, CLIP_LAYER)
    sites.add("ln_final.hook_normalized", Site(f"{base}post_layernorm", view=Unsqueeze(1),
                                               shape="[batch, 1, d_model]"))
    sites.add("hook_pooled", Site(f"{base}post_layernorm", shape=POOLED))
    if getattr(model, "visual_projection", None) is not None:
        sites.add("hook_image_embed", Site("visual_projection", shape="[batch, d_proj]"))
    return sites.done()


def hf_clip_text_sites(model: nn.Module, prefix: str = "text.", projection: str = "text_projection"
                       ) -> dict[str, Site]:
    """`CLIPModel`'s text tower (and SigLIP's, whose `projection` is "text_model.head"): the token
    embedding, the layers, the final norm on every token, the pooled position (the projection's
    input) and the text embedding. Position embeddings are one [1, pos, d_model] row shared by the
    batch, so `hook_pos_embed` is not mapped."""
    sites = SiteMap(prefix)
    sites.add("hook_embed", Site("text_model.embeddings.token_embedding"))
    _layers(sites, "text_model.encoder.layers", model.text_model.encoder.layers, CLIP_LAYER)
    sites.add("ln_final.hook_normalized", Site("text_model.final_layer_norm"))
    sites.add("hook_pooled", Site(projection, "input", shape=POOLED))
    sites.add("hook_text_embed", Site(projection, shape="[batch, d_proj]"))
    return sites.done()


def hf_clip_sites(model: nn.Module) -> dict[str, Site]:
    """`CLIPModel`: both towers, image first; `CLIPVisionModel`: HookedViT's unprefixed names."""
    if not hasattr(model, "text_model"):
        return hf_clip_vision_sites(model, prefix="")
    return {**hf_clip_vision_sites(model, prefix="visual."), **hf_clip_text_sites(model)}


def hf_vit_sites(model: nn.Module, encoder: str = "vit") -> dict[str, Site]:
    """transformers `ViTForImageClassification` / `ViTModel` (and DeiT's, `encoder="deit"`):
    HookedViT's unprefixed names. The patch embedding is `patch_embeddings`' flattened output;
    positions are added inline (no `hook_embed`); `ln_final` is `layernorm` on every token;
    `hook_pooled` is the classifier's input, or the pooler's (the normalised class token)."""
    base = f"{encoder}." if hasattr(model, encoder) else ""
    inner = getattr(model, encoder) if base else model
    sites = SiteMap()
    sites.add("hook_patch_embed", Site(f"{base}embeddings.patch_embeddings", shape=TOKENS))
    _layers(sites, f"{base}layers", inner.layers, VIT_LAYER)
    sites.add("ln_final.hook_normalized", Site(f"{base}layernorm"))
    if getattr(model, "classifier", None) is not None:
        sites.add("hook_pooled", Site("classifier", "input", shape=POOLED))
    elif getattr(inner, "pooler", None) is not None:
        sites.add("hook_pooled", Site(f"{base}pooler.dense", "input", shape=POOLED))
    return sites.done()
