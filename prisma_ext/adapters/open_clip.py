"""Adapter for open_clip CLIP models whose towers are open_clip's own ViT (or a timm ViT trunk,
`open_clip_trunk`) and open_clip's own text transformer.

Structural flags read from the modules themselves: activation (GELU or QuickGELU), norm eps,
heads and widths, ln_pre, pooling (class token or average), the final norm before or after
pooling, layer scale, causal mask, text pooling (argmax / eos / last / first) and projections.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..hooked.config import TextConfig, ViTConfig
from ..hooked.weights import BlockWeights, TextWeights, ViTWeights
from .base import CLIPAdapter, norm_params
from .open_clip_hf_text import check_hf_text, hf_text_config, is_hf_text, layout, refuse_on_tl

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_CLASSES = ("CLIP", "CustomTextCLIP")


def _act_name(act: nn.Module, where: str) -> str:
    kind = type(act).__name__
    if kind == "QuickGELU":
        return "quick_gelu"
    if kind == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    raise UnsupportedModelError(f"{where}: activation {kind} is not supported (GELU, QuickGELU are)")


def _eps(norm: nn.Module, where: str) -> float:
    if not (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine):
        raise UnsupportedModelError(f"{where} is {type(norm).__name__}; only affine LayerNorm is supported")
    return norm.eps


def resblock_weights(blk: nn.Module) -> BlockWeights:
    """One open_clip ResidualAttentionBlock (nn.MultiheadAttention inside) in canonical form."""
    attn = blk.attn
    return BlockWeights(
        ln1=norm_params(blk.ln_1), qkv_w=attn.in_proj_weight, qkv_b=attn.in_proj_bias,
        proj_w=attn.out_proj.weight, proj_b=attn.out_proj.bias, ln2=norm_params(blk.ln_2),
        fc1_w=blk.mlp.c_fc.weight, fc1_b=blk.mlp.c_fc.bias,
        fc2_w=blk.mlp.c_proj.weight, fc2_b=blk.mlp.c_proj.bias,
        ls1=getattr(blk.ls_1, "gamma", None), ls2=getattr(blk.ls_2, "gamma", None),
    )


def _check_resblocks(blocks, where: str) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    for i, blk in enumerate(blocks):
        if type(blk) is not ResidualAttentionBlock:
            raise UnsupportedModelError(
                f"{where}: block type {type(blk).__name__} (open_clip's custom block: qk_norm, scaled "
                "cosine attention or scale_* norms) is not supported")
        if not blk.attn.batch_first or blk.attn.in_proj_weight is None:
            raise UnsupportedModelError(f"{where}: attention with separate q/k/v weights is not supported")
        _act_name(blk.mlp.gelu, where)
        _eps(blk.ln_1, f"{where}.resblocks.{i}.ln_1")


def _tower_widths(blocks) -> dict:
    blk = blocks[0]
    d = blk.attn.embed_dim
    heads = blk.attn.num_heads
    return dict(d_model=d, n_layers=len(blocks), n_heads=heads, d_head=d // heads,
                d_mlp=blk.mlp.c_fc.out_features, act_fn=_act_name(blk.mlp.gelu, "mlp"), eps=blk.ln_1.eps)


def _text_projection(t: TextParts):
    """The text projection as (weight [d_proj, d_model], bias); a tower without one (its pooled
    token is the embedding) as an identity, so every CLIP text tower has `hook_text_embed`."""
    proj = t.projection
    if isinstance(proj, nn.Linear):
        return proj.weight, proj.bias
    if proj is not None:
        return proj.T, None
    import torch

    weight = t.token_embedding.weight
    return torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device), None


def _is_trunk(visual: nn.Module) -> bool:
    return type(visual).__name__ == "TimmModel" and hasattr(visual, "trunk")


def _first_set(*values):
    """The first value that is not None (0 and "" count as set: an eos id of 0 is an id)."""
    return next((v for v in values if v is not None), None)


class TextParts:
    """The text tower's pieces, wherever the CLIP class keeps them."""

    def __init__(self, model: nn.Module):
        src = model.text if hasattr(model, "text") else model
        self.src = src
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.blocks = src.transformer.resblocks
        self.ln_final = src.ln_final
        self.projection = src.text_projection
        self.attn_mask = src.attn_mask
        self.pool = _first_set(getattr(src, "pool_type", None), getattr(model, "text_pool_type", None), "argmax")
        self.eos_id = _first_set(getattr(src, "eos_id", None), getattr(model, "text_eos_id", None), None)


class OpenCLIPAdapter(CLIPAdapter):
    """open_clip `CLIP` / `CustomTextCLIP` with open_clip's own ViT and text towers."""

    name = "open_clip"

    def matches(self, module: nn.Module) -> bool:
        return type(module).__module__.startswith("open_clip.") and type(module).__name__ in CLIP_CLASSES

    def refusal(self, module: nn.Module) -> str | None:
        if not type(module).__module__.startswith("open_clip."):
            return None
        kind = type(module).__name__
        if kind == "CoCa":
            return ("open_clip CoCa is not supported: its attentional pooler and the text class token "
                    "appended after the prompt have no HookedCLIP counterpart yet")
        return f"open_clip {kind} is not supported; supported: {', '.join(CLIP_CLASSES)}"

    def check(self, model: nn.Module) -> None:
        self.check_vision(model)
        if is_hf_text(model):
            refuse_on_tl(model)
        self._check_text(model)

    def check_traced(self, model: nn.Module) -> None:
        """The nnsight backend also traces Hugging Face text towers (RoBERTa, XLM-R, mT5, NLLB)."""
        self.check_vision(model)
        if is_hf_text(model):
            check_hf_text(model)
        else:
            self._check_text(model)

    def check_vision(self, model: nn.Module) -> None:
        from open_clip.transformer import VisionTransformer

        visual = model.visual
        if _is_trunk(visual):
            from .open_clip_trunk import check_trunk

            check_trunk(visual)
        elif type(visual) is not VisionTransformer:
            feature = {"ModifiedResNet": "a ResNet visual tower"}.get(type(visual).__name__, type(visual).__name__)
            raise UnsupportedModelError(f"open_clip visual tower: {feature} is not supported")
        else:
            self._check_own_visual(visual)

    @staticmethod
    def _check_own_visual(visual: nn.Module) -> None:
        if visual.attn_pool is not None:
            raise UnsupportedModelError("open_clip visual tower: the attentional pooler (CoCa) is not supported")
        if visual.pool_type not in ("tok", "avg"):
            raise UnsupportedModelError(f"open_clip visual tower: pool_type={visual.pool_type!r} is not supported")
        if visual.proj is None:
            raise UnsupportedModelError("open_clip visual tower without its projection is not supported")
        _check_resblocks(visual.transformer.resblocks, "visual.transformer")

    @staticmethod
    def _check_text(model: nn.Module) -> None:
        from open_clip.transformer import TextTransformer

        if hasattr(model, "text") and type(model.text) is not TextTransformer:
            raise UnsupportedModelError(f"open_clip text tower {type(model.text).__name__} is not supported")
        text = TextParts(model)
        if getattr(text.src, "cls_emb", None) is not None:
            raise UnsupportedModelError("open_clip text tower: the appended class token (CoCa) is not supported")
        if getattr(text.src, "use_pad_mask", False):
            raise UnsupportedModelError("open_clip text tower: the padding mask is not supported")
        if text.pool not in ("argmax", "eos", "last", "first"):
            raise UnsupportedModelError(f"open_clip text tower: pool_type={text.pool!r} is not supported")
        _check_resblocks(text.blocks, "text.transformer")

    # ---------------------------------------------------------------- vision
    def config(self, model: nn.Module) -> ViTConfig:
        v = model.visual
        from open_clip import get_model_preprocess_cfg

        pre = get_model_preprocess_cfg(model) or {}
        if _is_trunk(v):
            from .open_clip_trunk import trunk_config

            return trunk_config(v, mean=tuple(pre.get("mean", OPENAI_MEAN)), std=tuple(pre.get("std", OPENAI_STD)),
                                crop_pct=1.0, source=getattr(model, "_prisma_source", "open_clip"))
        return ViTConfig(
            **_tower_widths(v.transformer.resblocks),
            eps_final=_eps(v.ln_post, "visual.ln_post"),
            final_norm="pooled" if v.final_ln_after_pool else "tokens",
            d_proj=v.proj.shape[1],
            n_classes=0,
            img_size=tuple(v.image_size),
            patch_size=tuple(v.patch_size),
            in_chans=v.conv1.in_channels,
            eps_pre=_eps(v.ln_pre, "visual.ln_pre") if not isinstance(v.ln_pre, nn.Identity) else 1e-5,
            n_cls=1,
            ln_pre=not isinstance(v.ln_pre, nn.Identity),
            global_pool="token" if v.pool_type == "tok" else "avg",
            mean=tuple(pre.get("mean", OPENAI_MEAN)),
            std=tuple(pre.get("std", OPENAI_STD)),
            crop_pct=1.0,
            source=getattr(model, "_prisma_source", "open_clip"),
            dtype=v.conv1.weight.dtype,
            device=v.conv1.weight.device,
        )

    def weights(self, model: nn.Module) -> ViTWeights:
        v = model.visual
        if _is_trunk(v):
            from .open_clip_trunk import trunk_weights

            return trunk_weights(v)
        return ViTWeights(
            patch_w=v.conv1.weight, patch_b=v.conv1.bias, cls=v.class_embedding, dist=None, reg=None,
            pos_embed=v.positional_embedding, ln_pre=norm_params(v.ln_pre),
            blocks=[resblock_weights(b) for b in v.transformer.resblocks],
            ln_final=norm_params(v.ln_post), head_w=None, head_b=None,
            proj_w=v.proj.T, proj_b=None,
        )

    # ---------------------------------------------------------------- text
    def text_config(self, model: nn.Module) -> TextConfig:
        source = getattr(model, "_prisma_source", "open_clip")
        if is_hf_text(model):
            return hf_text_config(model, _configured_context(model), source)
        t = TextParts(model)
        d_proj = _text_projection(t)[0].shape[0]
        return TextConfig(
            **_tower_widths(t.blocks),
            eps_final=_eps(t.ln_final, "text.ln_final"),
            d_proj=d_proj,
            vocab_size=t.token_embedding.num_embeddings,
            context_length=t.positional_embedding.shape[0],
            causal=t.attn_mask is not None,
            pool=t.pool,
            eos_id=t.eos_id if t.eos_id is not None else 2,
            source=getattr(model, "_prisma_source", "open_clip"),
            dtype=t.token_embedding.weight.dtype,
            device=t.token_embedding.weight.device,
        )

    def text_weights(self, model: nn.Module) -> TextWeights:
        t = TextParts(model)
        proj_w, proj_b = _text_projection(t)
        return TextWeights(
            token_embed=t.token_embedding.weight, pos_embed=t.positional_embedding,
            blocks=[resblock_weights(b) for b in t.blocks], ln_final=norm_params(t.ln_final),
            proj_w=proj_w, proj_b=proj_b,
        )

    def tokenizer(self, model: nn.Module):
        """A factory for the prompt tokenizer (built on first use: some live on the hub)."""
        from ..hooked.tokenize import PromptTokenizer
        from .tokenizers import open_clip_tokenizer

        cfg = self.text_config(model)
        arch = getattr(model, "_prisma_arch", None)
        if arch is None and not (cfg.vocab_size == 49408 and cfg.pool == "argmax"):
            return None  # an instance whose tokenizer we cannot tell: pass token ids
        return lambda: PromptTokenizer(open_clip_tokenizer(arch, cfg.context_length), cfg.context_length)

    def reference_image_embed(self, model: nn.Module, images):
        return model.encode_image(images)

    def reference_text_embed(self, model: nn.Module, tokens):
        return model.encode_text(tokens)

    def logit_scale(self, model: nn.Module):
        return model.logit_scale

    def logit_bias(self, model: nn.Module):
        return getattr(model, "logit_bias", None)

    # ---------------------------------------------------------------- nnsight sites
    def site_map(self, model: nn.Module) -> dict:
        """HookedCLIP's site names on open_clip's own modules, image tower first
        (`prisma_ext.sitemaps.open_clip`)."""
        from ..sitemaps.open_clip import open_clip_text_sites, open_clip_visual_sites

        if is_hf_text(model):
            from ..sitemaps.open_clip_hf_text import hf_text_encoder_sites

            text = hf_text_encoder_sites(model, layout(model))
        else:
            text = open_clip_text_sites(model)
        if _is_trunk(model.visual):
            from .open_clip_trunk import trunk_sites

            return {**trunk_sites(model.visual), **text}
        return {**open_clip_visual_sites(model.visual), **text}


def _configured_context(model: nn.Module) -> int | None:
    """The context length open_clip's tokenizer pads a named model's prompts to, or None."""
    arch = getattr(model, "_prisma_arch", None)
    if arch is None:
        return None
    from open_clip.factory import get_model_config
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH

    return ((get_model_config(arch) or {}).get("text_cfg") or {}).get("context_length", DEFAULT_CONTEXT_LENGTH)


ADAPTERS = [OpenCLIPAdapter()]
