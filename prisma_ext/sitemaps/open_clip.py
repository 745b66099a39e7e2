"""open_clip CLIP towers: HookedCLIP's site names on open_clip's own modules.

Names carry the tower prefix (`visual.`, `text.`). `nn.MultiheadAttention` computes q/k/v, the
pattern and `z` inside one functional call, so those sites come from a per-trace explicit
attention body (`sitemaps.attention.ExplicitMHA`); the pattern site also switches it from SDPA
to the explicit softmax. `hook_attn_out`/`hook_mlp_out` are the layer-scale outputs.
"""

from __future__ import annotations

from torch import nn

from .attention import ExplicitMHA
from .builder import D_MLP, HEADS, PATTERN, POOLED, TOKENS, BlockSites, SiteMap
from .spec import IDENTITY, Chunk, ConvTokens, Heads, Site, TupleItem, Unsqueeze


def _blocks(sites: SiteMap, path: str, blocks: nn.ModuleList) -> None:
    """Sites of open_clip `ResidualAttentionBlock`s at `path` (e.g. "visual.transformer.resblocks")."""
    for i, blk in enumerate(blocks):
        p, heads = f"{path}.{i}", blk.attn.num_heads
        attn = f"{p}.attn"
        q, k, v = (Site(attn, "qkv", Chunk(j, 3, heads), HEADS, prepare=ExplicitMHA(attn)) for j in range(3))
        sites.block(i, BlockSites(
            resid_pre=Site(p, "input"), ln1=Site(f"{p}.ln_1"), q=q, k=k, v=v,
            pattern=Site(attn, "pattern", shape=PATTERN, prepare=ExplicitMHA(attn, pattern=True)),
            z=Site(attn, "z", Heads(heads), HEADS, prepare=ExplicitMHA(attn)),
            attn_out=Site(f"{p}.ls_1"),
            resid_mid=Site(f"{p}.ln_2", "input", in_place=True), ln2=Site(f"{p}.ln_2"),
            mlp_pre=Site(f"{p}.mlp.c_fc", shape=D_MLP), mlp_post=Site(f"{p}.mlp.gelu", shape=D_MLP),
            mlp_out=Site(f"{p}.ls_2"), resid_post=Site(p)))


def open_clip_visual_sites(v: nn.Module, prefix: str = "visual.", path: str = "visual") -> dict[str, Site]:
    """open_clip `VisionTransformer` (class token, tok/avg pooling, ln_post before or after
    pooling, optional ln_pre). `hook_image_embed` is the tower's output (pooled @ proj)."""
    sites = SiteMap(prefix)
    sites.add("hook_patch_embed", Site(f"{path}.conv1", view=ConvTokens(), shape=TOKENS))
    if not isinstance(v.ln_pre, nn.Identity):
        sites.add("hook_full_embed", Site(f"{path}.ln_pre", "input"))
        sites.add("ln_pre.hook_normalized", Site(f"{path}.ln_pre"))
        sites.add("hook_embed", Site(f"{path}.ln_pre"))  # the same tensor, as in HookedViT
    _blocks(sites, f"{path}.transformer.resblocks", v.transformer.resblocks)
    if v.final_ln_after_pool:
        sites.add("ln_final.hook_normalized", Site(f"{path}.ln_post", view=Unsqueeze(1), shape="[batch, 1, d_model]"))
        sites.add("hook_pooled", Site(f"{path}.ln_post", shape=POOLED))
    else:
        sites.add("ln_final.hook_normalized", Site(f"{path}.ln_post"))
    sites.add("hook_image_embed", Site(path, view=TupleItem(0) if v.output_tokens else IDENTITY,
                                       shape="[batch, d_proj]"))
    return sites.done()


def open_clip_text_sites(model: nn.Module, prefix: str = "text.") -> dict[str, Site]:
    """open_clip's text tower, on the CLIP model itself (`CLIP`) or on `model.text`
    (`CustomTextCLIP`). Positions are added inline (no `hook_pos_embed`); the pooled token and
    the text embedding are sites where a module sees them (a Linear projection, a `text` tower)."""
    custom = hasattr(model, "text")
    tower = model.text if custom else model
    base = "text." if custom else ""
    sites = SiteMap(prefix)
    sites.add("hook_embed", Site(f"{base}token_embedding"))
    _blocks(sites, f"{base}transformer.resblocks", tower.transformer.resblocks)
    sites.add("ln_final.hook_normalized", Site(f"{base}ln_final"))
    if isinstance(tower.text_projection, nn.Linear):
        sites.add("hook_pooled", Site(f"{base}text_projection", "input", shape=POOLED))
        sites.add("hook_text_embed", Site(f"{base}text_projection", shape="[batch, d_proj]"))
    elif custom:
        sites.add("hook_text_embed", Site("text", view=TupleItem(0) if tower.output_tokens else IDENTITY,
                                          shape="[batch, d_proj]"))
    return sites.done()

