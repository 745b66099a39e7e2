"""Adapter for timm's `VisionTransformer` family (plain, DeiT distilled, DINOv2 with registers,
CLIP-style `norm_pre`, average-pooled with `fc_norm`, SigLIP's attention-pool `map` head)."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..hooked.config import ViTConfig
from ..hooked.weights import AttnPoolWeights, BlockWeights, ViTWeights
from .base import Adapter
from .timm_layers import GATED, act_name, check_mlp, mlp_weights, mlp_width, norm_kind, norm_params, tower_norms

SUPPORTED_CLASSES = ("VisionTransformer", "VisionTransformerDistilled", "Eva")
# timm classes we know and refuse, with the feature that stops us
REFUSED_CLASSES = {
    "SwinTransformer": "windowed, shifted attention (Swin)",
    "SwinTransformerV2": "windowed attention with log-spaced position bias (Swin V2)",
    "Beit": "relative position bias (BEiT)",
    "VisionTransformerRelPos": "relative position bias",
    "NaFlexVit": "variable-resolution patch packing (NaFlex)",
    "VisionTransformerSAM": "windowed attention with relative positions (SAM)",
    "Hiera": "hierarchical pooling attention (Hiera)",
    "MaxxVit": "convolutional stages with block/grid attention (MaxViT)",
}
# timm block and MLP classes we know and refuse, with what makes them differ
REFUSED_BLOCKS = {"ResPostBlock": "post-norm blocks (the norm after each residual branch)",
                  "ParallelScalingBlock": "parallel attention and MLP branches",
                  "ParallelThingsBlock": "parallel attention and MLP branches",
                  "DiffParallelScalingBlock": "differential attention"}


def _from_timm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("timm.")


def _per_channel(values, in_chans: int) -> tuple[float, ...]:
    """timm's normalisation statistics for `in_chans` channels: as given when they match; a model
    made for other channels than its config's (e.g. in_chans=1 from an RGB config) gets their mean."""
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    return (sum(values) / len(values),) * in_chans


def _final_norm(m: nn.Module) -> tuple[str, nn.Module]:
    """("tokens" | "pooled" | "none", the norm module) as timm's forward applies it. A distilled
    model's head never calls `fc_norm`, so there only `norm` counts."""
    distilled = getattr(m, "dist_token", None) is not None
    if not distilled and not isinstance(m.fc_norm, nn.Identity):
        return "pooled", m.fc_norm
    if not isinstance(m.norm, nn.Identity):
        return "tokens", m.norm
    return "none", m.norm


class TimmViTAdapter(Adapter):
    """timm `VisionTransformer` and `VisionTransformerDistilled`."""

    name = "timm-vit"

    def matches(self, module: nn.Module) -> bool:
        return _from_timm(module) and type(module).__name__ in SUPPORTED_CLASSES[:2]

    def refusal(self, module: nn.Module) -> str | None:
        kind = type(module).__name__
        if _from_timm(module) and kind in REFUSED_CLASSES:
            return (f"timm {kind} is not supported: it uses {REFUSED_CLASSES[kind]}. Supported timm "
                    f"classes: {', '.join(SUPPORTED_CLASSES)} (plain ViT, DeiT, DINOv2, CLIP-style, "
                    "average-pooled and SigLIP map-head variants; Eva: EVA-02, DINOv3, PE, RoPE ViTs)")
        if _from_timm(module) and kind not in SUPPORTED_CLASSES:
            return (f"timm {kind} is not supported; supported timm classes: {', '.join(SUPPORTED_CLASSES)}")
        return None

    # ---------------------------------------------------------------- checks
    def check(self, m: nn.Module) -> None:
        from timm.layers import PatchEmbed
        from timm.layers.attention import Attention
        from timm.models.vision_transformer import Block

        def refuse(feature: str) -> None:
            where = f"timm {type(m).__name__} ({self._arch(m)})"
            raise UnsupportedModelError(f"{where}: {feature} is not supported")

        if not isinstance(m.patch_embed, PatchEmbed) or type(m.patch_embed).forward is not PatchEmbed.forward \
                or not isinstance(m.patch_embed.proj, nn.Conv2d):
            refuse(f"patch embedding {type(m.patch_embed).__name__} (a hybrid CNN stem, or a patch embedding "
                   "with its own forward)")
        if m.patch_embed.dynamic_img_pad:
            refuse("dynamic_img_pad (padding images to a multiple of the patch size)")
        if getattr(m, "dist_token", None) is not None and m.no_embed_class:
            refuse("VisionTransformerDistilled with no_embed_class=True (timm's own forward fails on it: its "
                   "position table keeps rows for the prefix tokens that it adds after the positions)")
        if m.global_pool == "map":
            self._check_pool(m.attn_pool, refuse)
        elif m.global_pool in ("avgmax", "max"):
            refuse(f"global_pool={m.global_pool!r} (max pooling is not linear in the tokens)")
        elif m.global_pool == "":
            refuse("global_pool='' (no pooling: the model outputs every token)")
        elif m.global_pool not in ("token", "avg"):
            refuse(f"global_pool={m.global_pool!r} ({type(getattr(m, 'attn_pool', None)).__name__}; supported: "
                   "token, avg, map)")
        for i, blk in enumerate(m.blocks):
            kind = type(blk).__name__
            if kind in REFUSED_BLOCKS:
                refuse(f"block type {kind}: {REFUSED_BLOCKS[kind]} (blocks.{i})")
            if type(blk) is not Block:
                refuse(f"block type {kind} (blocks.{i})")
            attn = blk.attn
            if type(attn) is not Attention:
                refuse(f"attention type {type(attn).__name__}")
            if getattr(attn, "gate", None) is not None:
                refuse("gated attention (a sigmoid gate on the heads' outputs)")
            check_mlp(blk.mlp, f"blocks.{i}.mlp")
        self.norms(m)  # one kind and one eps for every norm, or refused by name

    def norms(self, m: nn.Module):
        """Every norm of the model, one kind and eps (`timm_layers.Norms`)."""
        named = {"norm_pre": m.norm_pre, "the final norm": _final_norm(m)[1], "patch_embed.norm": m.patch_embed.norm}
        for i, blk in enumerate(m.blocks):
            named.update({f"blocks.{i}.norm1": blk.norm1, f"blocks.{i}.norm2": blk.norm2,
                          f"blocks.{i}.attn.q_norm": blk.attn.q_norm, f"blocks.{i}.attn.k_norm": blk.attn.k_norm,
                          f"blocks.{i}.attn.norm": blk.attn.norm, f"blocks.{i}.mlp.norm": blk.mlp.norm})
        if m.global_pool == "map":
            named["attn_pool.norm"] = m.attn_pool.norm
        return tower_norms(named)

    @staticmethod
    def _check_pool(pool: nn.Module, refuse) -> None:
        from timm.layers import AttentionPoolLatent

        if type(pool) is not AttentionPoolLatent:
            refuse(f"attention pool {type(pool).__name__}")
        if pool.pos_embed is not None:
            refuse("a position embedding inside the attention pool")
        if not (isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity)):
            refuse("qk_norm in the attention pool")
        if pool.pool != "token" or pool.mlp is None or isinstance(pool.q, nn.Identity):
            refuse("an attention pool without its query projection, MLP or token output")

    @staticmethod
    def _arch(m: nn.Module) -> str:
        return (getattr(m, "pretrained_cfg", None) or {}).get("architecture", "custom config")

    # ---------------------------------------------------------------- config
    def config(self, m: nn.Module) -> ViTConfig:
        n_dist = 1 if getattr(m, "dist_token", None) is not None else 0
        return ViTConfig(
            **self._config_fields(m),
            n_dist=n_dist,
            n_reg=0 if n_dist else m.num_reg_tokens,  # timm's distilled forward never adds registers
            pool_include_prefix=bool(m.pool_include_prefix),
        )

    def _config_fields(self, m: nn.Module) -> dict:
        """The config fields timm's VisionTransformer and Eva describe alike (widths, norms, MLP,
        patch embedding, positions, pooling, final norm, attention pool, preprocessing)."""
        blk = m.blocks[0]
        pre_cfg = getattr(m, "pretrained_cfg", None) or {}
        arch, tag = pre_cfg.get("architecture", ""), pre_cfg.get("tag")
        norms = self.norms(m)
        in_chans = m.patch_embed.proj.in_channels
        pool = m.attn_pool if m.global_pool == "map" else None
        return dict(
            d_model=m.embed_dim,
            n_layers=len(m.blocks),
            n_heads=blk.attn.num_heads,
            d_head=blk.attn.head_dim,
            d_mlp=mlp_width(blk.mlp),
            n_classes=m.head.out_features if isinstance(m.head, nn.Linear) else 0,
            img_size=tuple(m.patch_embed.img_size),
            patch_size=tuple(m.patch_embed.patch_size),
            in_chans=in_chans,
            act_fn=act_name(blk.mlp.act),
            eps=norms.eps, eps_final=norms.eps, eps_pre=norms.eps,
            norm_type=norms.kind,
            qk_norm=norm_kind(blk.attn.q_norm, "attn.q_norm") is not None,
            attn_norm=norm_kind(blk.attn.norm, "attn.norm") is not None,
            gated_mlp=type(blk.mlp).__name__ in GATED,
            mlp_norm=norm_kind(blk.mlp.norm, "mlp.norm") is not None,
            patch_norm=norm_kind(m.patch_embed.norm, "patch_embed.norm") is not None,
            n_cls=1 if m.cls_token is not None else 0,
            has_pos_embed=m.pos_embed is not None,
            pos_embed_on_prefix=not m.no_embed_class,
            pos_embed_grid=tuple(m.patch_embed.grid_size),
            dynamic_img_size=bool(m.dynamic_img_size),
            ln_pre=not isinstance(m.norm_pre, nn.Identity),
            global_pool=m.global_pool,
            final_norm=_final_norm(m)[0],
            attn_pool_heads=pool.num_heads if pool is not None else 0,
            attn_pool_latent_len=pool.latent_len if pool is not None else 1,
            attn_pool_d_mlp=pool.mlp.fc1.out_features if pool is not None else 0,
            attn_pool_act=act_name(pool.mlp.act) if pool is not None else "",
            source=getattr(m, "_prisma_source", None)  # builtin:NAME, set by the zoo
            or (f"timm:{arch}{'.' + tag if tag else ''}" if arch else "timm"),
            mean=_per_channel(pre_cfg.get("mean", (0.5,)), in_chans),
            std=_per_channel(pre_cfg.get("std", (0.5,)), in_chans),
            crop_pct=float(pre_cfg.get("crop_pct", 1.0) or 1.0),
            dtype=m.patch_embed.proj.weight.dtype,
            device=m.patch_embed.proj.weight.device,
        )

    # ---------------------------------------------------------------- weights
    def weights(self, m: nn.Module) -> ViTWeights:
        blocks = [BlockWeights(**self._block_fields(blk), qkv_w=blk.attn.qkv.weight, qkv_b=blk.attn.qkv.bias,
                               ls1=getattr(blk.ls1, "gamma", None), ls2=getattr(blk.ls2, "gamma", None))
                  for blk in m.blocks]
        dist_head = getattr(m, "head_dist", None)
        dist = getattr(m, "dist_token", None)
        return ViTWeights(
            **self._weight_fields(m),
            blocks=blocks,
            dist=dist.reshape(-1) if dist is not None else None,
            reg=m.reg_token.reshape(-1, m.embed_dim) if m.reg_token is not None and dist is None else None,
            head_dist_w=dist_head.weight if isinstance(dist_head, nn.Linear) else None,
            head_dist_b=dist_head.bias if isinstance(dist_head, nn.Linear) else None,
        )

    @staticmethod
    def _block_fields(blk: nn.Module) -> dict:
        """A block's weights that VisionTransformer and Eva keep alike (all but qkv and layer scale)."""
        attn = blk.attn
        return dict(ln1=norm_params(blk.norm1), proj_w=attn.proj.weight, proj_b=attn.proj.bias,
                    ln2=norm_params(blk.norm2), **mlp_weights(blk.mlp), q_norm=norm_params(attn.q_norm),
                    k_norm=norm_params(attn.k_norm), attn_norm=norm_params(attn.norm))

    def _weight_fields(self, m: nn.Module) -> dict:
        """The model's weights outside the blocks that VisionTransformer and Eva keep alike."""
        return dict(
            patch_w=m.patch_embed.proj.weight,
            patch_b=m.patch_embed.proj.bias,
            patch_norm=norm_params(m.patch_embed.norm),
            cls=m.cls_token.reshape(-1) if m.cls_token is not None else None,
            pos_embed=m.pos_embed.reshape(-1, m.embed_dim) if m.pos_embed is not None else None,
            ln_pre=norm_params(m.norm_pre),
            ln_final=norm_params(_final_norm(m)[1]),
            head_w=m.head.weight if isinstance(m.head, nn.Linear) else None,
            head_b=m.head.bias if isinstance(m.head, nn.Linear) else None,
            attn_pool=self._pool_weights(m.attn_pool) if m.global_pool == "map" else None,
        )

    @staticmethod
    def _pool_weights(pool: nn.Module) -> AttnPoolWeights:
        return AttnPoolWeights(
            latent=pool.latent.reshape(pool.latent_len, -1),
            q_w=pool.q.weight, q_b=pool.q.bias, kv_w=pool.kv.weight, kv_b=pool.kv.bias,
            proj_w=pool.proj.weight, proj_b=pool.proj.bias, norm=norm_params(pool.norm),
            fc1_w=pool.mlp.fc1.weight, fc1_b=pool.mlp.fc1.bias,
            fc2_w=pool.mlp.fc2.weight, fc2_b=pool.mlp.fc2.bias,
        )

    # ---------------------------------------------------------------- nnsight sites
    def site_map(self, m: nn.Module) -> dict:
        """HookedViT's site names on timm's own submodules (`prisma_ext.sitemaps.timm`)."""
        from ..sitemaps.timm import timm_vit_sites

        return timm_vit_sites(m)

    def class_names(self, m: nn.Module) -> list[str] | None:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(m)
        if not subset:
            return self._label_names(m)
        info = ImageNetInfo(subset)
        n = getattr(m, "num_classes", 0)
        if info.num_classes() != n:
            return None
        return [info.index_to_description(i).split(",")[0].strip() for i in range(n)]

    @staticmethod
    def _label_names(m: nn.Module) -> list[str] | None:
        """timm's own `pretrained_cfg["label_names"]` (a list, or a dict index -> name), each
        replaced by its `label_descriptions` entry where there is one; None if absent."""
        cfg = getattr(m, "pretrained_cfg", None) or {}
        labels, descriptions = cfg.get("label_names"), cfg.get("label_descriptions") or {}
        n = getattr(m, "num_classes", 0)
        if isinstance(labels, dict):
            labels = [labels.get(i, labels.get(str(i))) for i in range(n)]
        if not labels or len(labels) != n or any(label is None for label in labels):
            return None
        return [str(descriptions.get(label, label)) for label in labels]


ADAPTERS = [TimmViTAdapter()]
