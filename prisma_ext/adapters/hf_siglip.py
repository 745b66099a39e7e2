"""Adapters for Hugging Face SigLIP and SigLIP 2: `SiglipModel` / `Siglip2Model` (both towers ->
HookedCLIP), `SiglipVisionModel` / `Siglip2VisionModel` (the image tower -> HookedViT, output
`pooler_output`) and `SiglipForImageClassification` / `Siglip2ForImageClassification` (->
HookedViT with its classifier).

The image tower has no class token: patches plus positions, pre-norm layers, `post_layernorm` on
every token, then the attention-pool head (`SiglipMultiheadAttentionPoolingHead`: a learned probe
attends over the tokens through an `nn.MultiheadAttention`, then a residual LayerNorm-MLP), which
is HookedViT's `global_pool="map"`. Its output is the image embedding itself: there is no image
projection, so a HookedCLIP gets an identity one (every CLIP vision tower has `hook_image_embed`).
The text tower is bidirectional, pooled at the last position after `final_layer_norm`, then its
`head` Linear (with bias) is the text projection. logits = exp(logit_scale) * cos + logit_bias.
The classifier averages `post_layernorm`'s tokens (`global_pool="avg"`); its attention pool, if
built, is unused.

SigLIP 2 takes NaFlex inputs: patches [batch, n_patches, p*p*C] from a Linear patch embedding,
`pixel_attention_mask` and `spatial_shapes`, with the position grid resized to each image's
shape. For square images of the model's own grid (sqrt(num_patches) patches a side) and no
padding that resize is exactly the identity, so the hooked model takes images [batch, 3, H, W]
of that size; `naflex_inputs` cuts them into the inputs transformers takes (the reference forward
here, and the nnsight backend's traces, `prisma_ext.traced.siglip`). Other sizes, non-square grids and
padded inputs are what HookedViT has no part for.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..hooked.config import TextConfig, ViTConfig
from ..hooked.weights import AttnPoolWeights, TextWeights, ViTWeights
from .base import conv_patch_weight, norm_params
from .hf_clip import encoder_weights
from .hf_common import HF_ACTS, TransformersAdapter, TransformersCLIPAdapter

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def hf_act(config, what: str) -> str:
    """A transformers config's `hidden_act` as our activation name, or a refusal naming it and
    `what` has it (a class name, a tower)."""
    act = config.hidden_act
    if act not in HF_ACTS:
        raise UnsupportedModelError(f"Hugging Face {what}: activation {act!r} is not supported "
                                    f"(supported: {', '.join(HF_ACTS)})")
    return HF_ACTS[act]


def source_of(model: nn.Module, family: str) -> str:
    """Where the model came from: what `hf:` set, else its `name_or_path`, else `family`."""
    return getattr(model, "_prisma_source", f"hf:{getattr(model, 'name_or_path', '') or family}")


def hf_tokenizer_auto(model: nn.Module, context_length: int):
    """A `PromptTokenizer` over the tokenizer saved with the model (`AutoTokenizer`, local files only:
    SigLIP's SentencePiece, SigLIP 2's Gemma, MetaCLIP 2's XLM-R), padding to the context as these
    models were trained; None when none is saved (then pass token ids)."""
    from ..hooked.tokenize import PromptTokenizer
    from .tokenizers import hf_tokenizer

    path = getattr(model, "name_or_path", "") or ""
    fn = hf_tokenizer(path, "AutoTokenizer") if path else None
    return PromptTokenizer(fn, context_length, pad_id=fn.pad_id or 0) if fn is not None else None


def naflex_inputs(images: Tensor, patch_size: int) -> dict[str, Tensor]:
    """Images [batch, C, H, W] as SigLIP 2's inputs: `pixel_values` [batch, gh * gw, p * p * C]
    (patches row-major, each flattened by rows, columns, then channels, as `Siglip2ImageProcessor`
    does), `pixel_attention_mask` [batch, gh * gw] (ones: no padding) and `spatial_shapes` [batch, 2]."""
    batch, chans, height, width = images.shape
    p = patch_size
    gh, gw = height // p, width // p
    patches = images.reshape(batch, chans, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(batch, gh * gw, -1)
    mask = torch.ones(batch, gh * gw, dtype=torch.int32, device=images.device)
    shapes = torch.tensor([gh, gw], dtype=torch.long, device=images.device).expand(batch, 2)
    return dict(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)


def _widths(config, family: str) -> dict:
    heads = config.num_attention_heads
    return dict(d_model=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=heads,
                d_head=config.hidden_size // heads, d_mlp=config.intermediate_size,
                act_fn=hf_act(config, family), eps=config.layer_norm_eps, eps_final=config.layer_norm_eps)


def _naflex(model: nn.Module) -> bool:
    """Whether `model` (or its image tower) is SigLIP 2's: a Linear patch embedding over NaFlex patches."""
    return type(model).__name__.startswith("Siglip2")


def _family(model: nn.Module) -> str:
    return "SigLIP 2" if _naflex(model) else "SigLIP"


def siglip_grid(vision: nn.Module) -> int:
    """The patches a side of a SigLIP (2) image tower's own grid."""
    if _naflex(vision):
        side = math.isqrt(vision.config.num_patches)
        if side * side != vision.config.num_patches:
            raise UnsupportedModelError(f"Hugging Face {type(vision).__name__}: num_patches="
                                        f"{vision.config.num_patches}, a position grid that is not square, is "
                                        "not supported")
        return side
    return vision.config.image_size // vision.config.patch_size


def _pool_weights(head: nn.Module) -> AttnPoolWeights:
    """SigLIP's `SiglipMultiheadAttentionPoolingHead` (probe, nn.MultiheadAttention, layernorm, mlp)."""
    mha, d = head.attention, head.probe.shape[-1]
    w, b = mha.in_proj_weight, mha.in_proj_bias
    return AttnPoolWeights(
        latent=head.probe.reshape(1, d), q_w=w[:d], q_b=b[:d], kv_w=w[d:], kv_b=b[d:],
        proj_w=mha.out_proj.weight, proj_b=mha.out_proj.bias, norm=norm_params(head.layernorm),
        fc1_w=head.mlp.fc1.weight, fc1_b=head.mlp.fc1.bias, fc2_w=head.mlp.fc2.weight, fc2_b=head.mlp.fc2.bias,
        eps=head.layernorm.eps)


class SiglipTower:
    """The image tower's config and weights, shared by the adapters below (`vision` is a
    `SiglipVisionModel` or `Siglip2VisionModel`)."""

    def vision_config(self, model: nn.Module, vision: nn.Module, **fields) -> ViTConfig:
        cfg = vision.config
        patch = vision.embeddings.patch_embedding
        side = siglip_grid(vision) * cfg.patch_size
        return ViTConfig(
            **_widths(cfg, "SigLIP"), final_norm="tokens", img_size=(side, side),
            patch_size=(cfg.patch_size, cfg.patch_size), in_chans=cfg.num_channels, n_cls=0,
            mean=SIGLIP_MEAN, std=SIGLIP_STD, crop_pct=1.0, source=source_of(model, _family(model)),
            dtype=patch.weight.dtype, device=patch.weight.device, **fields)

    def vision_weights(self, vision: nn.Module, pool: bool = True) -> ViTWeights:
        emb, cfg = vision.embeddings, vision.config
        patch = emb.patch_embedding
        patch_w = (conv_patch_weight(patch.weight, cfg.patch_size, cfg.num_channels, "(p1 p2 c)")
                   if isinstance(patch, nn.Linear) else patch.weight)
        return ViTWeights(
            patch_w=patch_w, patch_b=patch.bias, cls=None, dist=None, reg=None,
            pos_embed=emb.position_embedding.weight, ln_pre=None, blocks=encoder_weights(vision.encoder),
            ln_final=norm_params(vision.post_layernorm), head_w=None, head_b=None,
            attn_pool=_pool_weights(vision.head) if pool else None)

    def check_vision(self, model: nn.Module, vision: nn.Module, pooled: bool = True) -> None:
        kind = type(model).__name__
        hf_act(vision.config, kind)
        siglip_grid(vision)
        if pooled and not vision.config.vision_use_head:
            raise UnsupportedModelError(f"Hugging Face {kind}: vision_use_head=False (no attention-pool head, so no "
                                        "pooled output: the tower gives only its tokens) is not supported")
        head = getattr(vision, "head", None)
        if pooled and head is not None and not head.attention._qkv_same_embed_dim:
            raise UnsupportedModelError(f"Hugging Face {kind}: an attention-pool head with separate key/value "
                                        "widths is not supported")


class HFSiglipAdapter(SiglipTower, TransformersCLIPAdapter):
    """transformers `SiglipModel` / `Siglip2Model` -> HookedCLIP (image embedding: the attention
    pool's output through an identity projection; text: the last position's `head`);
    `SiglipVisionModel` / `Siglip2VisionModel` -> HookedViT whose output is `pooler_output`.
    SigLIP 2 reads images of its own square grid (see the module docstring); its nnsight traces
    take images too (`traced_class`)."""

    name = "hf-siglip"
    classes = ("SiglipModel", "SiglipVisionModel", "Siglip2Model", "Siglip2VisionModel")
    family = "Siglip"
    model_types = {"siglip": "SiglipModel", "siglip_vision_model": "SiglipVisionModel",
                   "siglip2": "Siglip2Model", "siglip2_vision_model": "Siglip2VisionModel"}

    # a TracedCLIP whose SigLIP 2 forward call gets NaFlex patches (SigLIP's runs as it is)
    traced_class = "prisma_ext.traced.siglip:TracedSiglip"

    @staticmethod
    def _vision(model: nn.Module) -> nn.Module:
        return getattr(model, "vision_model", model)

    def is_clip(self, model: nn.Module) -> bool:
        return hasattr(model, "text_model")

    def check(self, model: nn.Module) -> None:
        vision = self._vision(model)
        self.check_vision(model, vision)
        if self.is_clip(model):
            text = model.text_model.config
            hf_act(text, f"{type(model).__name__}'s text tower")
            if text.projection_size != vision.config.hidden_size:
                raise UnsupportedModelError(
                    f"Hugging Face {type(model).__name__}: a text projection_size ({text.projection_size}) other "
                    f"than the image width ({vision.config.hidden_size}) is not supported (the model compares "
                    "the two embeddings directly)")

    def config(self, model: nn.Module) -> ViTConfig:
        vision = self._vision(model)
        cfg = vision.config
        return self.vision_config(
            model, vision, d_proj=cfg.hidden_size if self.is_clip(model) else 0, global_pool="map",
            attn_pool_heads=vision.head.attention.num_heads, attn_pool_d_mlp=cfg.intermediate_size,
            attn_pool_act=hf_act(cfg, "SigLIP"))

    def weights(self, model: nn.Module) -> ViTWeights:
        weights = self.vision_weights(self._vision(model))
        if self.is_clip(model):  # no image projection: the pooled vector is the embedding
            d = model.vision_model.config.hidden_size
            like = weights.patch_w
            weights.proj_w = torch.eye(d, dtype=like.dtype, device=like.device)
        return weights

    def text_config(self, model: nn.Module) -> TextConfig:
        text = model.text_model
        cfg = text.config
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else 0
        return TextConfig(
            **_widths(cfg, "SigLIP"), d_proj=text.head.out_features, vocab_size=cfg.vocab_size,
            context_length=cfg.max_position_embeddings, causal=False, pool="last", eos_id=eos,
            source=source_of(model, _family(model)), dtype=text.head.weight.dtype, device=text.head.weight.device)

    def text_weights(self, model: nn.Module) -> TextWeights:
        text = model.text_model
        return TextWeights(
            token_embed=text.embeddings.token_embedding.weight, pos_embed=text.embeddings.position_embedding.weight,
            blocks=encoder_weights(text.encoder), ln_final=norm_params(text.final_layer_norm),
            proj_w=text.head.weight, proj_b=text.head.bias)

    def tokenizer(self, model: nn.Module):
        return hf_tokenizer_auto(model, model.text_model.config.max_position_embeddings)

    def logit_scale(self, model: nn.Module) -> Tensor:
        return model.logit_scale

    def logit_bias(self, model: nn.Module) -> Tensor:
        return model.logit_bias

    # ---------------------------------------------------------------- what the source computes
    def image_inputs(self, model: nn.Module, images: Tensor) -> dict[str, Tensor]:
        """The source's image arguments for images [batch, C, H, W] (SigLIP 2: NaFlex patches)."""
        if _naflex(model):
            return naflex_inputs(images, self._vision(model).config.patch_size)
        return dict(pixel_values=images)

    def reference_output(self, model: nn.Module, images: Tensor) -> Tensor:
        return model(**self.image_inputs(model, images)).pooler_output

    def reference_image_embed(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.get_image_features(**self.image_inputs(model, images)).pooler_output

    def reference_text_embed(self, model: nn.Module, tokens: Tensor) -> Tensor:
        return model.get_text_features(input_ids=tokens).pooler_output

    def site_map(self, model: nn.Module) -> dict:
        """HookedCLIP's site names on the transformers modules (`prisma_ext.sitemaps.hf_siglip`)."""
        from ..sitemaps.hf_siglip import hf_siglip_sites

        return hf_siglip_sites(model)


class HFSiglipClassifierAdapter(SiglipTower, TransformersAdapter):
    """transformers `SiglipForImageClassification` / `Siglip2ForImageClassification` -> HookedViT:
    `classifier` (a Linear, or none) on the mean of `post_layernorm`'s tokens (SigLIP 2: the mean
    under its mask, all ones here); the attention-pool head the vision tower may carry is not on
    that path. SigLIP 2's traces take images (`traced_class`)."""

    name = "hf-siglip-classifier"
    classes = ("SiglipForImageClassification", "Siglip2ForImageClassification")
    family = "Siglip"

    # a TracedViT whose SigLIP 2 forward call gets NaFlex patches
    traced_class = "prisma_ext.traced.siglip:TracedSiglipClassifier"

    def check(self, model: nn.Module) -> None:
        self.check_vision(model, model.vision_model, pooled=False)
        if not isinstance(model.classifier, (nn.Linear, nn.Identity)):
            raise UnsupportedModelError(f"a {type(model.classifier).__name__} classifier is not supported "
                                        "(a Linear one is)")

    def config(self, model: nn.Module) -> ViTConfig:
        head = model.classifier
        return self.vision_config(model, model.vision_model, global_pool="avg",
                                  n_classes=head.out_features if isinstance(head, nn.Linear) else 0)

    def weights(self, model: nn.Module) -> ViTWeights:
        weights = self.vision_weights(model.vision_model, pool=False)
        if isinstance(model.classifier, nn.Linear):
            weights.head_w, weights.head_b = model.classifier.weight, model.classifier.bias
        return weights

    def class_names(self, model: nn.Module) -> list[str] | None:
        labels = getattr(model.config, "id2label", None)
        if not isinstance(model.classifier, nn.Linear) or not labels:
            return None
        return [str(labels.get(i, labels.get(str(i), i))) for i in range(model.classifier.out_features)]

    def reference_output(self, model: nn.Module, images: Tensor) -> Tensor:
        if _naflex(model):
            return model(**naflex_inputs(images, model.vision_model.config.patch_size)).logits
        return model(pixel_values=images).logits

    def site_map(self, model: nn.Module) -> dict:
        from ..sitemaps.hf_siglip import hf_siglip_classifier_sites

        return hf_siglip_classifier_sites(model)


ADAPTERS = [HFSiglipAdapter(), HFSiglipClassifierAdapter()]
