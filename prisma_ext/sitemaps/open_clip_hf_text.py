"""HookedCLIP's text site names on an open_clip `HFTextEncoder` (nnsight backend only).

The block sites keep their TL meaning where the layer has them: `hook_resid_pre`/`hook_resid_post`
are a layer's input and output, q/k/v the projections' outputs, `z` the output projection's input,
`hook_attn_out`/`hook_mlp_out` what each branch computes before it is added. In a post-norm layer
(BERT, RoBERTa, XLM-R) `hook_resid_mid` is the stream after the first add & norm (what the MLP
branch reads and adds to), and there are no `ln1`/`ln2` sites; in mT5 and M2M-100 (pre-norm) the
sites are the usual ones. The attention pattern is computed inside the attention kernel: not mapped.
"""

from __future__ import annotations

from torch import nn

from .builder import D_MLP, HEADS, POOLED, BlockSites, SiteMap
from .spec import IDENTITY, Heads, Site, TupleItem

LAST = TupleItem(0)  # a layer's output: item 0 of a tuple, or the tensor itself


def _bert(sites: SiteMap, path: str, layers: nn.ModuleList) -> None:
    for i, layer in enumerate(layers):
        p, heads = f"{path}.{i}", layer.attention.self.num_attention_heads
        attn = f"{p}.attention"
        q, k, v = (Site(f"{attn}.self.{x}", view=Heads(heads), shape=HEADS) for x in ("query", "key", "value"))
        sites.block(i, BlockSites(
            resid_pre=Site(p, "input"), q=q, k=k, v=v,
            z=Site(f"{attn}.output.dense", "input", Heads(heads), HEADS),
            attn_out=Site(f"{attn}.output.dense"), resid_mid=Site(attn, view=LAST),
            mlp_pre=Site(f"{p}.intermediate.dense", shape=D_MLP),
            mlp_post=Site(f"{p}.intermediate.intermediate_act_fn", shape=D_MLP),
            mlp_out=Site(f"{p}.output.dense"), resid_post=Site(p, view=LAST)))


def _t5(sites: SiteMap, path: str, blocks: nn.ModuleList) -> None:
    for i, block in enumerate(blocks):
        p = f"{path}.{i}"
        attn, ff = f"{p}.layer.0", f"{p}.layer.1"
        heads = block.layer[0].SelfAttention.n_heads
        q, k, v = (Site(f"{attn}.SelfAttention.{x}", view=Heads(heads), shape=HEADS) for x in "qkv")
        dense = f"{ff}.DenseReluDense"
        gated = hasattr(block.layer[1].DenseReluDense, "wi_1")
        sites.block(i, BlockSites(
            resid_pre=Site(p, "input"), ln1=Site(f"{attn}.layer_norm"), q=q, k=k, v=v,
            z=Site(f"{attn}.SelfAttention.o", "input", Heads(heads), HEADS),
            attn_out=Site(f"{attn}.SelfAttention", view=LAST),
            resid_mid=Site(ff, "input"), ln2=Site(f"{ff}.layer_norm"),
            mlp_pre=Site(f"{dense}.wi_0" if gated else f"{dense}.wi", shape=D_MLP),
            mlp_pre_linear=Site(f"{dense}.wi_1", shape=D_MLP) if gated else None,
            mlp_post=Site(f"{dense}.wo", "input", shape=D_MLP),
            mlp_out=Site(dense), resid_post=Site(p, view=LAST)))


def _m2m100(sites: SiteMap, path: str, layers: nn.ModuleList) -> None:
    for i, layer in enumerate(layers):
        p, heads = f"{path}.{i}", layer.self_attn.num_heads
        attn = f"{p}.self_attn"
        q, k, v = (Site(f"{attn}.{x}_proj", view=Heads(heads), shape=HEADS) for x in "qkv")
        sites.block(i, BlockSites(
            resid_pre=Site(p, "input"), ln1=Site(f"{p}.self_attn_layer_norm"), q=q, k=k, v=v,
            z=Site(f"{attn}.out_proj", "input", Heads(heads), HEADS), attn_out=Site(attn, view=LAST),
            resid_mid=Site(f"{p}.final_layer_norm", "input", in_place=True), ln2=Site(f"{p}.final_layer_norm"),
            mlp_pre=Site(f"{p}.fc1", shape=D_MLP), mlp_post=Site(f"{p}.fc2", "input", shape=D_MLP),
            mlp_out=Site(f"{p}.fc2"), resid_post=Site(p, view=LAST)))


# layout -> (embedding module, layers attribute, final norm or None, block-sites writer)
ENCODERS = {
    "bert": ("embeddings", "encoder.layer", None, _bert),
    "t5": ("embed_tokens", "block", "final_layer_norm", _t5),
    "m2m100": ("embed_tokens", "layers", "layer_norm", _m2m100),
}


def hf_text_encoder_sites(model: nn.Module, layout: str, prefix: str = "text.") -> dict[str, Site]:
    """Sites of `model.text` (an open_clip `HFTextEncoder` of `layout`): `hook_embed` (the
    embedding module's output), the blocks, `ln_final.hook_normalized` (pre-norm encoders),
    `hook_pooled` (the pooler's output, the projection's input) and `hook_text_embed`."""
    embed, layers_at, final, blocks = ENCODERS[layout]
    base = "text.transformer"
    layers = model.text.transformer.get_submodule(layers_at)
    sites = SiteMap(prefix)
    sites.add("hook_embed", Site(f"{base}.{embed}"))
    blocks(sites, f"{base}.{layers_at}", layers)
    if final is not None:
        sites.add("ln_final.hook_normalized", Site(f"{base}.{final}"))
    sites.add("hook_pooled", Site("text.proj", "input", shape=POOLED))
    sites.add("hook_text_embed", Site("text", view=LAST if model.text.output_tokens else IDENTITY,
                                      shape="[batch, d_proj]"))
    return sites.done()
