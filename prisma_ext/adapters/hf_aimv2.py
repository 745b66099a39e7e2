"""Adapter for Hugging Face AIMv2's image tower, `Aimv2VisionModel` (-> HookedViT, output
`pooler_output`); `Aimv2Model` and `Aimv2TextModel` are refused by name.

The tower: a patch convolution, an RMSNorm on the patch tokens (`patch_norm`), learned positions
(or, with `is_native`, the fixed 2-D sine-cosine table of the model's own grid), pre-RMSNorm layers
with a SwiGLU MLP (`gated_mlp`: act(gate_proj) * up_proj, then down_proj), an RMSNorm on every
token, then `Aimv2AttentionPoolingHead`: a learned query (the head's `cls_token`, used as it is)
attends over the tokens through `k_proj` / `v_proj`, then `output_proj`. That is HookedViT's
attention pool with an identity query projection and no residual MLP (its MLP is all zeros, so
it adds exactly nothing; `attn_pool.mlp.*` sites read zeros).

The text tower is refused: transformers 5.24 runs it bidirectionally for token ids alone (and for
an all-ones `attention_mask` under SDPA, the default) and causally for a padded `attention_mask`
or eager attention, so no single HookedTextTransformer reproduces it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..hooked.config import ViTConfig
from ..hooked.weights import AttnPoolWeights, BlockWeights, ViTWeights
from .base import norm_params
from .hf_common import TransformersAdapter, is_transformers
from .hf_siglip import hf_act, source_of
from .open_clip import OPENAI_MEAN, OPENAI_STD

_AIMV2_TEXT = ("its text tower is not supported: transformers 5.24 makes its attention bidirectional or causal by "
               "how it is called (bidirectional for token ids alone, and for an all-ones attention_mask under SDPA; "
               "causal for a padded attention_mask or eager attention), so no one text tower reproduces it. The "
               "image tower alone (model.vision_model, an Aimv2VisionModel) is supported")


def _bias_cat(*layers: nn.Linear) -> Tensor | None:
    """The layers' biases stacked, or None when they have none."""
    return torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None


def _block(layer: nn.Module) -> BlockWeights:
    a, f = layer.attention, layer.ffn
    return BlockWeights(
        ln1=norm_params(layer.rms_norm1), qkv_w=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
        qkv_b=_bias_cat(a.q_proj, a.k_proj, a.v_proj), proj_w=a.out_proj.weight, proj_b=a.out_proj.bias,
        ln2=norm_params(layer.rms_norm2), fc1_w=f.up_proj.weight, fc1_b=f.up_proj.bias,
        fc2_w=f.down_proj.weight, fc2_b=f.down_proj.bias, gate_w=f.gate_proj.weight, gate_b=f.gate_proj.bias)


def _pool(head: nn.Module, eps: float) -> AttnPoolWeights:
    """`Aimv2AttentionPoolingHead` as an attention pool: the query is the `cls_token` itself (an
    identity q), keys and values `k_proj` / `v_proj`, out `output_proj`, and a residual MLP of
    width 1 that is all zeros (the head has none)."""
    d = head.hidden_size
    like = head.k_proj.weight
    eye = torch.eye(d, dtype=like.dtype, device=like.device)
    return AttnPoolWeights(
        latent=head.cls_token.reshape(1, d), q_w=eye, q_b=None,
        kv_w=torch.cat([head.k_proj.weight, head.v_proj.weight]), kv_b=_bias_cat(head.k_proj, head.v_proj),
        proj_w=head.output_proj.weight, proj_b=head.output_proj.bias,
        norm=(torch.ones_like(eye[0]), torch.zeros_like(eye[0])),
        fc1_w=like.new_zeros(1, d), fc1_b=None, fc2_w=like.new_zeros(d, 1), fc2_b=None, eps=eps)


def _positions(model: nn.Module) -> Tensor:
    """The position rows [grid * grid, d]: learned, or the sine-cosine table `is_native` computes
    for the model's own grid (halves swapped, as `Aimv2VisionEmbeddings.forward` does)."""
    emb, cfg = model.embeddings, model.config
    if not cfg.is_native:
        return emb.position_embedding.weight
    from transformers.models.aimv2.modeling_aimv2 import build_2d_sinusoidal_position_embedding

    like = emb.patch_embed.weight
    side = cfg.image_size // cfg.patch_size
    table = build_2d_sinusoidal_position_embedding(side, side, embed_dim=cfg.hidden_size, device=like.device,
                                                   dtype=like.dtype)
    half = table.shape[-1] // 2
    return torch.cat([table[..., half:], table[..., :half]], dim=-1)


class HFAimv2VisionAdapter(TransformersAdapter):
    """transformers `Aimv2VisionModel` -> HookedViT without head (output: `pooler_output`, the
    attention pool's vector); `Aimv2Model` / `Aimv2TextModel` match only to be refused (`refused`)."""

    name = "hf-aimv2"
    classes = ("Aimv2VisionModel",)
    family = "Aimv2"
    model_types = {"aimv2_vision_model": "Aimv2VisionModel"}
    refused = {"Aimv2Model": _AIMV2_TEXT, "Aimv2TextModel": _AIMV2_TEXT}

    def matches(self, module: nn.Module) -> bool:
        return super().matches(module) or (is_transformers(module) and type(module).__name__ in self.refused)

    def check(self, model: nn.Module) -> None:
        kind = type(model).__name__
        if kind in self.refused:
            raise UnsupportedModelError(f"Hugging Face {kind}: {self.refused[kind]}")
        cfg = model.config
        hf_act(cfg, kind)
        if not isinstance(cfg.image_size, int) or not isinstance(cfg.patch_size, int):
            raise UnsupportedModelError(f"Hugging Face {kind}: a non-square image_size / patch_size "
                                        f"({cfg.image_size}, {cfg.patch_size}) is not supported")
        if not cfg.use_head:
            raise UnsupportedModelError(f"Hugging Face {kind}: use_head=False (no attention-pool head, so no pooled "
                                        "output: the tower gives only its tokens) is not supported")

    def config(self, model: nn.Module) -> ViTConfig:
        cfg = model.config
        heads = cfg.num_attention_heads
        patch = model.embeddings.patch_embed
        return ViTConfig(
            d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=heads, d_head=cfg.hidden_size // heads,
            d_mlp=cfg.intermediate_size, act_fn=hf_act(cfg, "AIMv2"), eps=cfg.rms_norm_eps,
            eps_final=cfg.rms_norm_eps, eps_pre=cfg.rms_norm_eps, norm_type="rmsnorm", gated_mlp=True,
            patch_norm=True, final_norm="tokens", img_size=(cfg.image_size, cfg.image_size),
            patch_size=(cfg.patch_size, cfg.patch_size), in_chans=cfg.num_channels, n_cls=0,
            global_pool="map", attn_pool_heads=model.head.num_heads, attn_pool_d_mlp=1,
            mean=OPENAI_MEAN, std=OPENAI_STD, crop_pct=1.0, source=source_of(model, "AIMv2"),
            dtype=patch.weight.dtype, device=patch.weight.device)

    def weights(self, model: nn.Module) -> ViTWeights:
        emb = model.embeddings
        return ViTWeights(
            patch_w=emb.patch_embed.weight, patch_b=emb.patch_embed.bias, patch_norm=norm_params(emb.rms_norm),
            cls=None, dist=None, reg=None, pos_embed=_positions(model), ln_pre=None,
            blocks=[_block(layer) for layer in model.encoder.layers], ln_final=norm_params(model.rms_norm),
            head_w=None, head_b=None, attn_pool=_pool(model.head, model.config.rms_norm_eps))

    def reference_output(self, model: nn.Module, images: Tensor) -> Tensor:
        return model(pixel_values=images).pooler_output

    def site_map(self, model: nn.Module) -> dict:
        """HookedViT's site names on the transformers modules (`prisma_ext.sitemaps.hf_aimv2`)."""
        from ..sitemaps.hf_aimv2 import hf_aimv2_sites

        return hf_aimv2_sites(model)


ADAPTERS = [HFAimv2VisionAdapter()]
