"""Adapter for Hugging Face `ViTForImageClassification` and `ViTModel` (with or without its pooler).

The layout is transformers 5's: `vit.layers[i]` with `layernorm_before`, `attention.{q,k,v,o}_proj`,
`layernorm_after`, `mlp.fc1/fc2`; the final `layernorm` normalises every token and `classifier`
reads the class token. `ViTModel`'s pooler (dense + tanh on the class token) is a module head
(`head_type="module"`), and the output is then its `pooler_output`. Activation, eps, heads and
widths come from the model's config.
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import UnsupportedModelError
from ..hooked.config import ViTConfig
from ..hooked.weights import BlockWeights, ViTWeights
from .base import norm_params
from .hf_common import HF_ACTS, TransformersAdapter, class_token_output

HF_VIT_CLASSES = ("ViTForImageClassification", "ViTModel")


class HFViTAdapter(TransformersAdapter):
    """transformers `ViTForImageClassification` (logits from `classifier` on the class token) or
    `ViTModel` (its pooler as a module head; built with `add_pooling_layer=False`, no head:
    `n_classes=0`) -> HookedViT."""

    name = "hf-vit"
    classes = HF_VIT_CLASSES
    family = "ViT"
    model_types = {"vit": "ViTForImageClassification"}

    @staticmethod
    def _vit(model: nn.Module) -> nn.Module:
        return model.vit if hasattr(model, "vit") else model

    def check(self, model: nn.Module) -> None:
        vit = self._vit(model)
        cfg = vit.config
        if cfg.hidden_act not in HF_ACTS:
            raise UnsupportedModelError(f"Hugging Face ViT activation {cfg.hidden_act!r} is not supported "
                                        f"(supported: {', '.join(HF_ACTS)})")
        if not hasattr(vit, "layers"):
            raise UnsupportedModelError("this Hugging Face ViT predates transformers 5's layout "
                                        "(vit.layers with attention.q_proj/...); upgrade transformers")
        classifier = getattr(model, "classifier", None)
        if classifier is not None and not isinstance(classifier, (nn.Linear, nn.Identity)):
            raise UnsupportedModelError(f"a {type(classifier).__name__} classifier is not supported "
                                        "(a Linear one is)")

    def config(self, model: nn.Module) -> ViTConfig:
        vit = self._vit(model)
        cfg = vit.config
        attn = vit.layers[0].attention
        proj = vit.embeddings.patch_embeddings.projection
        classifier = getattr(model, "classifier", None)
        size = tuple(vit.embeddings.patch_embeddings.image_size)
        pooler = getattr(vit, "pooler", None)
        n_classes = classifier.out_features if isinstance(classifier, nn.Linear) else 0
        return ViTConfig(
            d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=attn.num_attention_heads,
            d_head=attn.head_dim, d_mlp=cfg.intermediate_size, act_fn=HF_ACTS[cfg.hidden_act],
            eps=cfg.layer_norm_eps, eps_final=cfg.layer_norm_eps, final_norm="tokens", d_proj=0,
            n_classes=pooler.dense.out_features if pooler is not None else n_classes,
            head_type="module" if pooler is not None else "linear",
            img_size=size, patch_size=tuple(proj.kernel_size), in_chans=proj.in_channels,
            n_cls=1, global_pool="token",
            source=getattr(model, "_prisma_source", f"hf:{getattr(model, 'name_or_path', '') or 'ViT'}"),
            dtype=proj.weight.dtype, device=proj.weight.device,
        )

    def weights(self, model: nn.Module) -> ViTWeights:
        import torch

        vit = self._vit(model)
        emb = vit.embeddings
        blocks = []
        for layer in vit.layers:
            a = layer.attention
            qkv_b = [p.bias if p.bias is not None else p.weight.new_zeros(p.out_features)
                     for p in (a.q_proj, a.k_proj, a.v_proj)]
            blocks.append(BlockWeights(
                ln1=norm_params(layer.layernorm_before),
                qkv_w=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                qkv_b=torch.cat(qkv_b), proj_w=a.o_proj.weight, proj_b=a.o_proj.bias,
                ln2=norm_params(layer.layernorm_after),
                fc1_w=layer.mlp.fc1.weight, fc1_b=layer.mlp.fc1.bias,
                fc2_w=layer.mlp.fc2.weight, fc2_b=layer.mlp.fc2.bias))
        classifier = getattr(model, "classifier", None)
        head = classifier if isinstance(classifier, nn.Linear) else None
        pooler = getattr(vit, "pooler", None)
        return ViTWeights(
            patch_w=emb.patch_embeddings.projection.weight, patch_b=emb.patch_embeddings.projection.bias,
            cls=emb.cls_token.reshape(-1), dist=None, reg=None, pos_embed=emb.position_embeddings[0],
            ln_pre=None, blocks=blocks, ln_final=norm_params(vit.layernorm),
            head_w=head.weight if head is not None else None, head_b=head.bias if head is not None else None,
            head_module=nn.Sequential(copy.deepcopy(pooler.dense), copy.deepcopy(pooler.activation))
            if pooler is not None else None)

    def output_tensor(self, output):
        """logits; a ViTModel's pooler output, or without a pooler the normalised class token."""
        return class_token_output(output)

    def reference_output(self, model: nn.Module, images):
        return self.output_tensor(model(pixel_values=images))

    def class_names(self, model: nn.Module) -> list[str] | None:
        classifier = getattr(model, "classifier", None)
        labels = getattr(model.config, "id2label", None)
        if not isinstance(classifier, nn.Linear) or not labels:
            return None
        return [str(labels.get(i, labels.get(str(i), i))) for i in range(classifier.out_features)]

    # ---------------------------------------------------------------- nnsight sites
    def site_map(self, model: nn.Module) -> dict:
        """HookedViT's site names on the transformers modules (`prisma_ext.sitemaps.hf`); with a
        pooler, `hook_pooled` is its dense layer's input (the normalised class token)."""
        from ..sitemaps.hf import hf_vit_sites

        return hf_vit_sites(model)


ADAPTERS = [HFViTAdapter()]
