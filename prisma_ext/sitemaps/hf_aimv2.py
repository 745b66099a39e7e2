"""Hugging Face AIMv2's image tower (`Aimv2VisionModel`): HookedViT's site names on the transformers modules.

`hook_patch_embed` is the patch RMSNorm's output (HookedViT's patch tokens are normalised inside
the embedding; positions are added inline, so neither `hook_embed` nor `hook_pos_embed`). Layers:
`rms_norm1`, `attention.{q,k,v,out}_proj` (the pattern served by `prisma_explicit`), `rms_norm2`,
`ffn` (`gate_proj` the gate, `up_proj` the linear branch, their product `down_proj`'s input).
`ln_final.hook_normalized` is `rms_norm` on every token, `hook_pooled` the pooling head's output;
the head's attention runs inline (SDPA), so no `attn_pool.*` site.
"""

from __future__ import annotations

from torch import nn

from .attention import ExplicitHFAttention
from .builder import D_MLP, HEADS, PATTERN, POOLED, TOKENS, BlockSites, SiteMap
from .spec import Heads, Site, TupleItem


def hf_aimv2_sites(model: nn.Module) -> dict[str, Site]:
    sites = SiteMap()
    sites.add("hook_patch_embed", Site("embeddings.rms_norm", shape=TOKENS))
    for i, layer in enumerate(model.encoder.layers):
        p, heads = f"encoder.layers.{i}", layer.attention.num_heads
        attn, ffn = f"{p}.attention", f"{p}.ffn"
        q, k, v = (Site(f"{attn}.{x}_proj", view=Heads(heads), shape=HEADS) for x in "qkv")
        sites.block(i, BlockSites(
            resid_pre=Site(p, "input"), ln1=Site(f"{p}.rms_norm1"), q=q, k=k, v=v,
            pattern=Site(attn, "pattern", shape=PATTERN, prepare=ExplicitHFAttention(attn)),
            z=Site(f"{attn}.out_proj", "input", Heads(heads), HEADS), attn_out=Site(attn, view=TupleItem(0)),
            resid_mid=Site(f"{p}.rms_norm2", "input", in_place=True), ln2=Site(f"{p}.rms_norm2"),
            mlp_pre=Site(f"{ffn}.gate_proj", shape=D_MLP), mlp_pre_linear=Site(f"{ffn}.up_proj", shape=D_MLP),
            mlp_post=Site(f"{ffn}.down_proj", "input", shape=D_MLP), mlp_out=Site(ffn),
            resid_post=Site(p, view=TupleItem(0))))
    sites.add("ln_final.hook_normalized", Site("rms_norm"))
    sites.add("hook_pooled", Site("head", shape=POOLED))
    return sites.done()
