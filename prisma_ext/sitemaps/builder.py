"""How every site map is written: `SiteMap` collects sites in forward order, `BlockSites` says
where one transformer block's sites live.

    sites = SiteMap(prefix="visual.")
    sites.add("hook_patch_embed", Site("conv1", view=ConvTokens(), shape=TOKENS))
    for i, blk in enumerate(blocks):
        sites.block(i, BlockSites(resid_pre=Site(f"blocks.{i}", "input"), ...))
    sites.add("ln_final.hook_normalized", Site("ln_post"))
    return sites.done()

`BlockSites` fixes the TL names and their order (the order a forward pass reaches them), so a
family's map only says where each one is; a field left `None` is a site this source does not
expose. The maps of timm, open_clip and Hugging Face are in `sitemaps.timm`,
`sitemaps.open_clip` and `sitemaps.hf`; docs/adapters.md shows one for your own module.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .spec import Site

HEADS = "[batch, pos, head, d_head]"
PATTERN = "[batch, head, query, key]"
D_MLP = "[batch, pos, d_mlp]"
TOKENS = "[batch, n_patches, d_model]"
POOLED = "[batch, d_model]"

# BlockSites field -> TL site name under `blocks.{i}.`, in forward order
BLOCK_NAMES = {
    "resid_pre": "hook_resid_pre",
    "ln1": "ln1.hook_normalized",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "q_norm": "attn.q_norm.hook_normalized",
    "k_norm": "attn.k_norm.hook_normalized",
    "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k",
    "pattern": "attn.hook_pattern",
    "z": "attn.hook_z",
    "attn_norm": "attn.norm.hook_normalized",
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "ln2": "ln2.hook_normalized",
    "mlp_pre": "mlp.hook_pre",
    "mlp_pre_linear": "mlp.hook_pre_linear",
    "mlp_post": "mlp.hook_post",
    "mlp_norm": "mlp.norm.hook_normalized",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}


@dataclass(frozen=True)
class BlockSites:
    """Where a pre-norm block's TL sites live in the source module (fields in forward order).

    `resid_pre`, `attn_out`, `resid_mid`, `mlp_out` and `resid_post` are required: the analysis
    methods read them. `attn_out`/`mlp_out` must be what the block adds to the residual stream
    (after any layer scale); `resid_mid` is usually a norm's input, and then `in_place=True`
    (the residual stream itself is also the skip connection).
    """

    resid_pre: Site
    attn_out: Site
    resid_mid: Site
    mlp_out: Site
    resid_post: Site
    ln1: Site | None = None
    q: Site | None = None
    k: Site | None = None
    v: Site | None = None
    pattern: Site | None = None
    z: Site | None = None
    ln2: Site | None = None
    mlp_pre: Site | None = None
    mlp_post: Site | None = None
    q_norm: Site | None = None
    k_norm: Site | None = None
    attn_norm: Site | None = None
    mlp_pre_linear: Site | None = None
    mlp_norm: Site | None = None
    rot_q: Site | None = None
    rot_k: Site | None = None

    def named(self, block: str) -> dict[str, Site]:
        """{f"{block}.{tl name}": site} in forward order, leaving out the unmapped ones."""
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        return {f"{block}.{tl}": given[field] for field, tl in BLOCK_NAMES.items() if given[field] is not None}


class SiteMap:
    """An ordered site map under a name prefix ("visual.", "text." or "" for a lone tower)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self._sites: dict[str, Site] = {}

    def add(self, name: str, site: Site) -> SiteMap:
        """Map TL site `name` (without the prefix) to `site`; sites are kept in the order added."""
        self._sites[self.prefix + name] = site
        return self

    def block(self, index: int, sites: BlockSites) -> SiteMap:
        """Map block `index`'s sites."""
        self._sites.update(sites.named(f"{self.prefix}blocks.{index}"))
        return self

    def done(self) -> dict[str, Site]:
        return dict(self._sites)
