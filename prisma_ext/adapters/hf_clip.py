"""Adapter for Hugging Face `CLIPModel` (both towers) and `CLIPVisionModel` (vision only).

Activation, eps, heads and widths come from the model's own config (`hidden_act`,
`layer_norm_eps`, ...), never from its name.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..hooked.config import TextConfig, ViTConfig
from ..hooked.weights import BlockWeights, TextWeights, ViTWeights
from .base import norm_params
from .hf_common import HF_ACTS, TransformersCLIPAdapter
from .open_clip import OPENAI_MEAN, OPENAI_STD

HF_CLASSES = ("CLIPModel", "CLIPVisionModel")


def _act(config) -> str:
    act = config.hidden_act
    if act not in HF_ACTS:
        raise UnsupportedModelError(f"Hugging Face CLIP activation {act!r} is not supported "
                                    f"(supported: {', '.join(HF_ACTS)})")
    return HF_ACTS[act]


def _widths(config) -> dict:
    heads = config.num_attention_heads
    return dict(d_model=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=heads,
                d_head=config.hidden_size // heads, d_mlp=config.intermediate_size, act_fn=_act(config),
                eps=config.layer_norm_eps, eps_final=config.layer_norm_eps)


def encoder_weights(encoder: nn.Module) -> list[BlockWeights]:
    blocks = []
    for layer in encoder.layers:
        a = layer.self_attn
        blocks.append(BlockWeights(
            ln1=norm_params(layer.layer_norm1),
            qkv_w=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
            qkv_b=torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
            proj_w=a.out_proj.weight, proj_b=a.out_proj.bias, ln2=norm_params(layer.layer_norm2),
            fc1_w=layer.mlp.fc1.weight, fc1_b=layer.mlp.fc1.bias,
            fc2_w=layer.mlp.fc2.weight, fc2_b=layer.mlp.fc2.bias))
    return blocks


def _features(out):
    """get_*_features' embedding: a tensor, or (transformers 5) an output with `pooler_output`."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFCLIPAdapter(TransformersCLIPAdapter):
    """transformers `CLIPModel` -> HookedCLIP; `CLIPVisionModel` -> HookedViT (pooled output)."""

    name = "hf-clip"
    classes = HF_CLASSES
    model_types = {"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel"}

    @staticmethod
    def _vision(model: nn.Module) -> nn.Module:
        return model.vision_model if hasattr(model, "vision_model") else model

    def config(self, model: nn.Module) -> ViTConfig:
        vision = self._vision(model)
        cfg = vision.config
        proj = getattr(model, "visual_projection", None)
        size = cfg.image_size
        return ViTConfig(
            **_widths(cfg),
            eps_pre=cfg.layer_norm_eps,
            final_norm="pooled",
            d_proj=proj.out_features if proj is not None else 0,
            n_classes=0,
            img_size=(size, size),
            patch_size=(cfg.patch_size, cfg.patch_size),
            in_chans=cfg.num_channels,
            n_cls=1,
            ln_pre=True,
            global_pool="token",
            mean=OPENAI_MEAN, std=OPENAI_STD, crop_pct=1.0,
            source=getattr(model, "_prisma_source", f"hf:{getattr(model, 'name_or_path', '') or 'CLIP'}"),
            dtype=vision.embeddings.patch_embedding.weight.dtype,
            device=vision.embeddings.patch_embedding.weight.device,
        )

    def weights(self, model: nn.Module) -> ViTWeights:
        vision = self._vision(model)
        emb = vision.embeddings
        proj = getattr(model, "visual_projection", None)
        return ViTWeights(
            patch_w=emb.patch_embedding.weight, patch_b=emb.patch_embedding.bias, cls=emb.class_embedding,
            dist=None, reg=None, pos_embed=emb.position_embedding.weight,
            ln_pre=norm_params(vision.pre_layrnorm), blocks=encoder_weights(vision.encoder),
            ln_final=norm_params(vision.post_layernorm), head_w=None, head_b=None,
            proj_w=proj.weight if proj is not None else None, proj_b=None)

    def text_config(self, model: nn.Module) -> TextConfig:
        cfg = model.text_model.config
        eos = cfg.eos_token_id
        return TextConfig(
            **_widths(cfg),
            d_proj=model.text_projection.out_features,
            vocab_size=cfg.vocab_size,
            context_length=cfg.max_position_embeddings,
            causal=True,
            pool="argmax" if eos == 2 else "eos",  # HF keeps the legacy rule for eos_token_id == 2
            eos_id=eos,
            source=self.config(model).source,
            dtype=model.text_projection.weight.dtype,
            device=model.text_projection.weight.device,
        )

    def text_weights(self, model: nn.Module) -> TextWeights:
        text = model.text_model
        return TextWeights(
            token_embed=text.embeddings.token_embedding.weight,
            pos_embed=text.embeddings.position_embedding.weight,
            blocks=encoder_weights(text.encoder), ln_final=norm_params(text.final_layer_norm),
            proj_w=model.text_projection.weight, proj_b=None)

    def tokenizer(self, model: nn.Module):
        """A factory for the prompt tokenizer: open_clip's copy of OpenAI CLIP's BPE for the usual
        49408-token vocabulary (it keeps the end-of-text token when it truncates), else the
        CLIPTokenizer saved with the model, else none (pass token ids)."""
        from ..hooked.tokenize import PromptTokenizer
        from .tokenizers import hf_tokenizer, open_clip_tokenizer

        cfg = self.text_config(model)
        if cfg.vocab_size == 49408:
            return lambda: PromptTokenizer(open_clip_tokenizer(None, cfg.context_length), cfg.context_length)
        path = getattr(model, "name_or_path", "") or ""
        fn = hf_tokenizer(path) if path else None
        if fn is None:
            return None
        return PromptTokenizer(fn, cfg.context_length, pad_id=fn.pad_id)

    def is_clip(self, model: nn.Module) -> bool:
        return hasattr(model, "text_model")  # CLIPVisionModel: a vision tower alone (HookedViT)

    def reference_output(self, model: nn.Module, images):
        return model(pixel_values=images).pooler_output  # CLIPVisionModel: the normalised class token

    def reference_image_embed(self, model: nn.Module, images):
        return _features(model.get_image_features(pixel_values=images))

    def reference_text_embed(self, model: nn.Module, tokens):
        return _features(model.get_text_features(input_ids=tokens))

    def logit_scale(self, model: nn.Module):
        return model.logit_scale

    # ---------------------------------------------------------------- nnsight sites
    def site_map(self, model: nn.Module) -> dict:
        """HookedCLIP's site names on the transformers modules (a `CLIPVisionModel`: HookedViT's
        unprefixed names), image tower first (`prisma_ext.sitemaps.hf`)."""
        from ..sitemaps.hf import hf_clip_sites

        return hf_clip_sites(model)


ADAPTERS = [HFCLIPAdapter()]
