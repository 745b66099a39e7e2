"""Site maps of CLIP towers: HookedCLIP's names on open_clip's and Hugging Face's own modules.

The CLIP adapters' `site_map` methods assemble these, tower by tower, in forward order (the
image tower runs first in both libraries). Names carry the tower prefix (`visual.`, `text.`;
none for a vision-only model, like its HookedViT). Semantics are HookedCLIP's: `hook_attn_out`
and `hook_mlp_out` are what a block adds to the residual stream (after open_clip's layer scale),
`hook_resid_mid` is the norm's input (the residual stream itself, so assignments copy into it),
q/k/v/z are per head, the pattern is the softmax output. Hugging Face ViT classifiers (`hf_vit`)
reuse the Hugging Face layer code under their own module names. Nothing here imports nnsight.
"""

from __future__ import annotations

from torch import nn

from .attention import ExplicitHFAttention, ExplicitMHA
from .sites import IDENTITY, Chunk, ConvTokens, Heads, Site, TupleItem, Unsqueeze

HEADS = "[batch, pos, head, d_head]"
PATTERN = "[batch, head, query, key]"
D_MLP = "[batch, pos, d_mlp]"
TOKENS = "[batch, n_patches, d_model]"


def _block_tail(sites: dict, b: str, norm2: str, mlp_in: str, act: str, mlp_out: str, block: str,
                block_view=IDENTITY) -> None:
    sites[f"{b}.hook_resid_mid"] = Site(norm2, "input", in_place=True)
    sites[f"{b}.ln2.hook_normalized"] = Site(norm2)
    sites[f"{b}.mlp.hook_pre"] = Site(mlp_in, shape=D_MLP)
    sites[f"{b}.mlp.hook_post"] = Site(act, shape=D_MLP)
    sites[f"{b}.hook_mlp_out"] = Site(mlp_out)
    sites[f"{b}.hook_resid_post"] = Site(block, view=block_view)


# ---------------------------------------------------------------------------- open_clip
def open_clip_blocks(prefix: str, path: str, blocks: nn.ModuleList) -> dict[str, Site]:
    """Sites of open_clip `ResidualAttentionBlock`s at `path` (e.g. "visual.transformer.resblocks").

    q/k/v, z and the pattern come from a per-trace explicit `nn.MultiheadAttention` body
    (`attention.ExplicitMHA`); the pattern site also switches it from SDPA to the explicit softmax.
    """
    sites: dict[str, Site] = {}
    for i, blk in enumerate(blocks):
        b, p, heads = f"{prefix}blocks.{i}", f"{path}.{i}", blk.attn.num_heads
        attn = f"{p}.attn"
        sites[f"{b}.hook_resid_pre"] = Site(p, "input")
        sites[f"{b}.ln1.hook_normalized"] = Site(f"{p}.ln_1")
        for j, name in enumerate("qkv"):
            sites[f"{b}.attn.hook_{name}"] = Site(attn, "qkv", Chunk(j, 3, heads), HEADS,
                                                  prepare=ExplicitMHA(attn))
        sites[f"{b}.attn.hook_pattern"] = Site(attn, "pattern", shape=PATTERN,
                                               prepare=ExplicitMHA(attn, pattern=True))
        sites[f"{b}.attn.hook_z"] = Site(attn, "z", Heads(heads), HEADS, prepare=ExplicitMHA(attn))
        sites[f"{b}.hook_attn_out"] = Site(f"{p}.ls_1")
        _block_tail(sites, b, f"{p}.ln_2", f"{p}.mlp.c_fc", f"{p}.mlp.gelu", f"{p}.ls_2", p)
    return sites


def open_clip_visual(v: nn.Module, prefix: str = "visual.", path: str = "visual") -> dict[str, Site]:
    """open_clip `VisionTransformer` (class token, tok/avg pooling, ln_post before or after
    pooling, optional ln_pre). `hook_image_embed` is the tower's output (pooled @ proj)."""
    sites = {f"{prefix}hook_patch_embed": Site(f"{path}.conv1", view=ConvTokens(), shape=TOKENS)}
    if not isinstance(v.ln_pre, nn.Identity):
        sites[f"{prefix}hook_full_embed"] = Site(f"{path}.ln_pre", "input")
        sites[f"{prefix}ln_pre.hook_normalized"] = Site(f"{path}.ln_pre")
        sites[f"{prefix}hook_embed"] = Site(f"{path}.ln_pre")  # the same tensor, as in HookedViT
    sites.update(open_clip_blocks(prefix, f"{path}.transformer.resblocks", v.transformer.resblocks))
    if v.final_ln_after_pool:
        sites[f"{prefix}ln_final.hook_normalized"] = Site(f"{path}.ln_post", view=Unsqueeze(1),
                                                          shape="[batch, 1, d_model]")
        sites[f"{prefix}hook_pooled"] = Site(f"{path}.ln_post", shape="[batch, d_model]")
    else:
        sites[f"{prefix}ln_final.hook_normalized"] = Site(f"{path}.ln_post")
    sites[f"{prefix}hook_image_embed"] = Site(path, view=TupleItem(0) if v.output_tokens else IDENTITY,
                                              shape="[batch, d_proj]")
    return sites


def open_clip_text(model: nn.Module, prefix: str = "text.") -> dict[str, Site]:
    """open_clip's text tower, on the CLIP model itself (`CLIP`) or on `model.text`
    (`CustomTextCLIP`). Positions are added inline (no `hook_pos_embed`); the pooled token and
    the text embedding are sites where a module sees them (a Linear projection, a `text` tower)."""
    custom = hasattr(model, "text")
    tower = model.text if custom else model
    base = "text." if custom else ""
    sites = {f"{prefix}hook_embed": Site(f"{base}token_embedding")}
    sites.update(open_clip_blocks(prefix, f"{base}transformer.resblocks", tower.transformer.resblocks))
    sites[f"{prefix}ln_final.hook_normalized"] = Site(f"{base}ln_final")
    if isinstance(tower.text_projection, nn.Linear):
        sites[f"{prefix}hook_pooled"] = Site(f"{base}text_projection", "input", shape="[batch, d_model]")
        sites[f"{prefix}hook_text_embed"] = Site(f"{base}text_projection", shape="[batch, d_proj]")
    elif custom:
        sites[f"{prefix}hook_text_embed"] = Site(
            "text", view=TupleItem(0) if tower.output_tokens else IDENTITY, shape="[batch, d_proj]")
    return sites


# ---------------------------------------------------------------------------- Hugging Face
HF_CLIP_LAYER = dict(attn="self_attn", ln1="layer_norm1", q="q_proj", k="k_proj", v="v_proj", o="out_proj",
                     ln2="layer_norm2", fc1="mlp.fc1", act="mlp.activation_fn", mlp="mlp", heads="num_heads")
HF_VIT_LAYER = dict(HF_CLIP_LAYER, attn="attention", ln1="layernorm_before", o="o_proj",
                    ln2="layernorm_after", heads="num_attention_heads")


def hf_layers(prefix: str, path: str, layers: nn.ModuleList, names: dict = HF_CLIP_LAYER) -> dict[str, Site]:
    """Sites of Hugging Face pre-norm encoder layers at `path` (e.g. "vision_model.encoder.layers"):
    `CLIPEncoderLayer`s, or with `names=HF_VIT_LAYER` transformers 5's `ViTLayer`s.

    q/k/v are the projections' outputs, z is the output projection's input, `hook_attn_out` is
    item 0 of the attention's (out, weights) output; the pattern switches that one attention
    module to `prisma_explicit` for the trace (`attention.ExplicitHFAttention`).
    """
    n = names
    sites: dict[str, Site] = {}
    for i, layer in enumerate(layers):
        b, p = f"{prefix}blocks.{i}", f"{path}.{i}"
        heads = getattr(getattr(layer, n["attn"]), n["heads"])
        attn = f"{p}.{n['attn']}"
        sites[f"{b}.hook_resid_pre"] = Site(p, "input")
        sites[f"{b}.ln1.hook_normalized"] = Site(f"{p}.{n['ln1']}")
        for name in "qkv":
            sites[f"{b}.attn.hook_{name}"] = Site(f"{attn}.{n[name]}", view=Heads(heads), shape=HEADS)
        sites[f"{b}.attn.hook_pattern"] = Site(attn, "pattern", shape=PATTERN,
                                               prepare=ExplicitHFAttention(attn))
        sites[f"{b}.attn.hook_z"] = Site(f"{attn}.{n['o']}", "input", Heads(heads), HEADS)
        sites[f"{b}.hook_attn_out"] = Site(attn, view=TupleItem(0))
        _block_tail(sites, b, f"{p}.{n['ln2']}", f"{p}.{n['fc1']}", f"{p}.{n['act']}", f"{p}.{n['mlp']}", p,
                    block_view=TupleItem(0))
    return sites


def hf_vision(model: nn.Module, prefix: str) -> dict[str, Site]:
    """`CLIPModel`'s image tower (`vision_model`, then `visual_projection`) or a `CLIPVisionModel`."""
    base = "vision_model." if hasattr(model, "vision_model") else ""
    vision = model.vision_model if base else model
    sites = {f"{prefix}hook_patch_embed": Site(f"{base}embeddings.patch_embedding", view=ConvTokens(),
                                               shape=TOKENS),
             f"{prefix}hook_full_embed": Site(f"{base}pre_layrnorm", "input"),
             f"{prefix}ln_pre.hook_normalized": Site(f"{base}pre_layrnorm"),
             f"{prefix}hook_embed": Site(f"{base}pre_layrnorm")}
    sites.update(hf_layers(prefix, f"{base}encoder.layers", vision.encoder.layers))
    sites[f"{prefix}ln_final.hook_normalized"] = Site(f"{base}post_layernorm", view=Unsqueeze(1),
                                                      shape="[batch, 1, d_model]")
    sites[f"{prefix}hook_pooled"] = Site(f"{base}post_layernorm", shape="[batch, d_model]")
    if getattr(model, "visual_projection", None) is not None:
        sites[f"{prefix}hook_image_embed"] = Site("visual_projection", shape="[batch, d_proj]")
    return sites


def hf_text(model: nn.Module, prefix: str = "text.") -> dict[str, Site]:
    """`CLIPModel`'s text tower: the token embedding, the layers, the final norm on every token,
    the pooled position (`text_projection`'s input) and the text embedding. Position embeddings
    are one [1, pos, d_model] row shared by the batch, so `hook_pos_embed` is not mapped."""
    sites = {f"{prefix}hook_embed": Site("text_model.embeddings.token_embedding")}
    sites.update(hf_layers(prefix, "text_model.encoder.layers", model.text_model.encoder.layers))
    sites[f"{prefix}ln_final.hook_normalized"] = Site("text_model.final_layer_norm")
    sites[f"{prefix}hook_pooled"] = Site("text_projection", "input", shape="[batch, d_model]")
    sites[f"{prefix}hook_text_embed"] = Site("text_projection", shape="[batch, d_proj]")
    return sites


def hf_vit(model: nn.Module) -> dict[str, Site]:
    """transformers `ViTForImageClassification` / `ViTModel`: HookedViT's unprefixed names. The
    patch embedding is `patch_embeddings`' flattened output; positions are added inline (no
    `hook_embed`); `ln_final` is `layernorm` on every token; `hook_pooled` is the classifier's input."""
    base = "vit." if hasattr(model, "vit") else ""
    vit = model.vit if base else model
    sites = {"hook_patch_embed": Site(f"{base}embeddings.patch_embeddings", shape=TOKENS)}
    sites.update(hf_layers("", f"{base}layers", vit.layers, HF_VIT_LAYER))
    sites["ln_final.hook_normalized"] = Site(f"{base}layernorm")
    if getattr(model, "classifier", None) is not None:
        sites["hook_pooled"] = Site("classifier", "input", shape="[batch, d_model]")
    return sites
