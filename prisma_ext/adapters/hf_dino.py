"""Adapters for Hugging Face DINOv2 (`Dinov2Model`, `Dinov2WithRegistersModel`), DINOv3
(`DINOv3ViTModel`) and DeiT (`DeiTForImageClassification`, `DeiTForImageClassificationWithTeacher`,
`DeiTModel`), transformers 5's layouts.

All are pre-norm ViTs with a final LayerNorm on every token. DINOv2 / DINOv3 layers have layer
scale (folded into the output projections) and optionally a gated MLP; DINOv2 with registers adds
positions to the class token and the patches before inserting the registers, so the class
token's position is folded into the class token (the registers and the class token are then
prefix tokens without position rows). DINOv3 has no absolute positions: rotary embeddings on the
patches' queries and keys ("half" layout), computed for any image size by the model's own RoPE
module (`HFRopeTables`). DeiT's distillation token is the second prefix token: a distillation
token (`n_dist=1`) where a head reads it (`...WithTeacher`: the two heads averaged), else a
register (`n_reg=1`), since nothing reads it. A pooler (`DeiTModel`: dense + activation on the
class token) is a module head, and the output is then `pooler_output`.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..hooked.config import ViTConfig
from ..hooked.rotary import RotaryWeights
from ..hooked.weights import BlockWeights, ViTWeights
from .base import norm_params
from .hf_common import HF_ACTS, TransformersAdapter, class_token_output, is_transformers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CONCAT_HEAD = ("its classifier reads the class token concatenated with the mean of the patch tokens "
                "(concat(CLS, mean of patches)), a readout HookedViT does not have")


def _pair(size) -> tuple[int, int]:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _qkv(attn: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Stacked [q; k; v] weight [3 * H * d_head, d] and bias (zeros where one projection has none;
    None when none has)."""
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([layer.weight for layer in layers])
    if all(layer.bias is None for layer in layers):
        return weight, None
    return weight, torch.cat([layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                              for layer in layers])


def _mlp(mlp: nn.Module) -> dict:
    """fc1/fc2 (DINOv2, DeiT), up_proj/down_proj (DINOv3) or gate_proj, up_proj, down_proj (gated:
    act(gate(x)) * up(x))."""
    if hasattr(mlp, "fc1"):
        return dict(fc1_w=mlp.fc1.weight, fc1_b=mlp.fc1.bias, fc2_w=mlp.fc2.weight, fc2_b=mlp.fc2.bias)
    gate = dict(gate_w=mlp.gate_proj.weight, gate_b=mlp.gate_proj.bias) if hasattr(mlp, "gate_proj") else {}
    return dict(fc1_w=mlp.up_proj.weight, fc1_b=mlp.up_proj.bias, fc2_w=mlp.down_proj.weight,
                fc2_b=mlp.down_proj.bias, **gate)


def _block(layer: nn.Module) -> BlockWeights:
    """One DINOv2 / DINOv3 layer (norm1, layer_scale1, ...) or DeiT layer (layernorm_before, ...)."""
    dino = hasattr(layer, "norm1")
    ln1, ln2 = (layer.norm1, layer.norm2) if dino else (layer.layernorm_before, layer.layernorm_after)
    scales = dict(ls1=layer.layer_scale1.lambda1, ls2=layer.layer_scale2.lambda1) if dino else {}
    attn = layer.attention
    qkv_w, qkv_b = _qkv(attn)
    return BlockWeights(ln1=norm_params(ln1), qkv_w=qkv_w, qkv_b=qkv_b, proj_w=attn.o_proj.weight,
                        proj_b=attn.o_proj.bias, ln2=norm_params(ln2), **_mlp(layer.mlp), **scales)


def _pooler_head(pooler: nn.Module) -> nn.Module:
    """A pooler (dense + activation on the class token) as a module head [..., d] -> [..., d_out]."""
    return nn.Sequential(copy.deepcopy(pooler.dense), copy.deepcopy(pooler.activation))


class HFRopeTables(nn.Module):
    """transformers' DINOv3 RoPE module as a table source for the hooked model: grid (h, w) ->
    (sin, cos) [1, h*w, 1, d_head] (hooked/rotary.py's layout), computed by the module itself
    exactly as `DINOv3ViTModel.forward` asks it (kept in eval mode: no train-time coordinate
    augmentation)."""

    def __init__(self, rope: nn.Module, patch_size: tuple[int, int]):
        super().__init__()
        self.rope = copy.deepcopy(rope).eval()
        self.patch_size = patch_size

    def train(self, mode: bool = True) -> HFRopeTables:
        return super().train(False)

    def forward(self, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        freq = self.rope.inv_freq
        # the module reads only the images' size, device and dtype: an empty batch of no channels
        pixels = freq.new_empty(1, 0, grid[0] * self.patch_size[0], grid[1] * self.patch_size[1], dtype=torch.float32)
        cos, sin = self.rope(pixels)
        return sin[None, :, None], cos[None, :, None]


class HFEncoderAdapter(TransformersAdapter):
    """What the adapters below share: the refused relatives (`refused`: class -> the feature, a
    class that matches only to be refused by `check`), the activation check, the config and
    weights of the pre-norm encoder, the reference output."""

    refused: dict[str, str] = {}
    default_pixels = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875)

    def matches(self, module: nn.Module) -> bool:
        return super().matches(module) or (is_transformers(module) and type(module).__name__ in self.refused)

    # the parts of a model, by subclass
    def trunk(self, model: nn.Module) -> nn.Module:
        """The encoder model (the classifier's `deit`, or the model itself)."""
        return model

    def layers(self, trunk: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self, trunk: nn.Module) -> nn.Module:
        raise NotImplementedError

    def act(self, model: nn.Module) -> str:
        """The MLP activation's name (`HF_ACTS`)."""
        return HF_ACTS[self.trunk(model).config.hidden_act]

    def check(self, model: nn.Module) -> None:
        kind = type(model).__name__
        if kind in self.refused:
            raise UnsupportedModelError(f"Hugging Face {kind}: {self.refused[kind]} is not supported; "
                                        f"supported: {', '.join(self.classes)}")
        act = self.trunk(model).config.hidden_act
        mlp = self.layers(self.trunk(model))[0].mlp
        if act not in HF_ACTS and type(mlp).__name__ != "Dinov2SwiGLUFFN":  # DINOv2's SwiGLU is always SiLU
            raise UnsupportedModelError(f"Hugging Face {kind}: activation {act!r} is not supported "
                                        f"(supported: {', '.join(HF_ACTS)})")

    def base_config(self, model: nn.Module, patch: nn.Conv2d, **fields) -> ViTConfig:
        """The widths, norms and activation every model here shares, and `fields`."""
        trunk = self.trunk(model)
        cfg = trunk.config
        layer = self.layers(trunk)[0]
        attn = layer.attention
        mlp = _mlp(layer.mlp)
        fields = {**self.default_pixels, **fields}
        return ViTConfig(
            d_model=cfg.hidden_size, n_layers=len(self.layers(trunk)),
            n_heads=getattr(attn, "num_heads", None) or attn.num_attention_heads, d_head=attn.head_dim,
            d_mlp=mlp["fc1_w"].shape[0], act_fn=self.act(model), gated_mlp="gate_w" in mlp,
            eps=cfg.layer_norm_eps, eps_final=self.final_norm(trunk).eps, final_norm="tokens", d_proj=0,
            patch_size=tuple(patch.kernel_size), in_chans=patch.in_channels, n_cls=1, global_pool="token",
            source=getattr(model, "_prisma_source", f"hf:{getattr(model, 'name_or_path', '') or type(model).__name__}"),
            dtype=patch.weight.dtype, device=patch.weight.device, **fields)

    def blocks(self, model: nn.Module) -> list[BlockWeights]:
        return [_block(layer) for layer in self.layers(self.trunk(model))]

    def reference_output(self, model: nn.Module, images: Tensor) -> Tensor:
        return model(pixel_values=images).pooler_output  # the normalised class token


class HFDinov2Adapter(HFEncoderAdapter):
    """transformers `Dinov2Model` / `Dinov2WithRegistersModel` -> HookedViT without head: the
    output is `pooler_output`, the final-normalised class token."""

    name = "hf-dinov2"
    classes = ("Dinov2Model", "Dinov2WithRegistersModel")
    family = "Dinov2"
    model_types = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
    refused = {"Dinov2ForImageClassification": _CONCAT_HEAD, "Dinov2WithRegistersForImageClassification": _CONCAT_HEAD,
               "Dinov2Backbone": "a backbone's per-stage feature maps",
               "Dinov2WithRegistersBackbone": "a backbone's per-stage feature maps"}

    def layers(self, trunk: nn.Module) -> nn.ModuleList:
        return trunk.encoder.layer

    def final_norm(self, trunk: nn.Module) -> nn.Module:
        return trunk.layernorm

    def act(self, model: nn.Module) -> str:
        return "silu" if model.config.use_swiglu_ffn else super().act(model)

    def check(self, model: nn.Module) -> None:
        super().check(model)
        size = _pair(model.config.image_size)
        if size[0] != size[1]:
            raise UnsupportedModelError(
                f"Hugging Face {type(model).__name__}: a non-square image_size {size} is not supported (the model "
                "resamples its square grid of position embeddings for every non-square image)")

    def config(self, model: nn.Module) -> ViTConfig:
        patch = model.embeddings.patch_embeddings.projection
        n_reg = getattr(model.config, "num_register_tokens", 0)
        return self.base_config(model, patch, img_size=_pair(model.config.image_size), n_reg=n_reg,
                                pos_embed_on_prefix=not n_reg)

    def weights(self, model: nn.Module) -> ViTWeights:
        emb = model.embeddings
        d = model.config.hidden_size
        pos, cls, reg = emb.position_embeddings[0], emb.cls_token.reshape(d), None
        if getattr(model.config, "num_register_tokens", 0):
            cls, pos = cls + pos[0], pos[1:]  # registers come after the positions: the class token's goes into it
            reg = emb.register_tokens.reshape(-1, d)
        proj = emb.patch_embeddings.projection
        return ViTWeights(patch_w=proj.weight, patch_b=proj.bias, cls=cls, dist=None, reg=reg, pos_embed=pos,
                          ln_pre=None, blocks=self.blocks(model), ln_final=norm_params(model.layernorm),
                          head_w=None, head_b=None)

    def site_map(self, model: nn.Module) -> dict:
        from ..sitemaps.hf_dino import hf_dinov2_sites

        return hf_dinov2_sites(model)


class HFDinov3Adapter(HFEncoderAdapter):
    """transformers `DINOv3ViTModel` -> HookedViT without head (output: `pooler_output`, the
    final-normalised class token); rotary positions, registers, layer scale, optional gated MLP
    and per-projection biases. Any image size the patches tile (`dynamic_img_size`), as the model."""

    name = "hf-dinov3"
    classes = ("DINOv3ViTModel",)
    family = "DINOv3ViT"
    model_types = {"dinov3_vit": "DINOv3ViTModel"}
    refused = {"DINOv3ViTBackbone": "a backbone's per-stage feature maps"}
    default_pixels = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=1.0)

    def layers(self, trunk: nn.Module) -> nn.ModuleList:
        return trunk.model.layer

    def final_norm(self, trunk: nn.Module) -> nn.Module:
        return trunk.norm

    def config(self, model: nn.Module) -> ViTConfig:
        patch = model.embeddings.patch_embeddings
        return self.base_config(model, patch, img_size=_pair(model.config.image_size),
                                n_reg=model.config.num_register_tokens, has_pos_embed=False, dynamic_img_size=True,
                                rotary="half", rotary_tables=1, rotary_heads=1)

    def weights(self, model: nn.Module) -> ViTWeights:
        emb = model.embeddings
        d = model.config.hidden_size
        patch = emb.patch_embeddings
        source = HFRopeTables(model.rope_embeddings, tuple(patch.kernel_size))
        size = _pair(model.config.image_size)
        sin, cos = source((size[0] // patch.kernel_size[0], size[1] // patch.kernel_size[1]))
        reg = emb.register_tokens.reshape(-1, d) if model.config.num_register_tokens else None
        return ViTWeights(patch_w=patch.weight, patch_b=patch.bias, cls=emb.cls_token.reshape(d), dist=None, reg=reg,
                          pos_embed=None, ln_pre=None, blocks=self.blocks(model), ln_final=norm_params(model.norm),
                          head_w=None, head_b=None, rotary=RotaryWeights(sin=sin, cos=cos, source=source))

    def site_map(self, model: nn.Module) -> dict:
        from ..sitemaps.hf_dino import hf_dinov3_sites

        return hf_dinov3_sites(model)


class HFDeiTAdapter(HFEncoderAdapter):
    """transformers `DeiTForImageClassificationWithTeacher` (class and distillation heads
    averaged), `DeiTForImageClassification` (the class token's head) and `DeiTModel` (its pooler
    as a module head, or, built with add_pooling_layer=False, no head) -> HookedViT."""

    name = "hf-deit"
    classes = ("DeiTForImageClassificationWithTeacher", "DeiTForImageClassification", "DeiTModel")
    family = "DeiT"
    model_types = {"deit": "DeiTForImageClassificationWithTeacher"}
    refused = {"DeiTForMaskedImageModeling": "masked image modeling (its decoder reconstructs pixels)"}

    def trunk(self, model: nn.Module) -> nn.Module:
        return model.deit if hasattr(model, "deit") else model

    def layers(self, trunk: nn.Module) -> nn.ModuleList:
        return trunk.layers

    def final_norm(self, trunk: nn.Module) -> nn.Module:
        return trunk.layernorm

    @staticmethod
    def _heads(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        """(class-token head, distillation head): Linear layers, Identity (num_labels=0) or None."""
        if hasattr(model, "cls_classifier"):
            return model.cls_classifier, model.distillation_classifier
        return getattr(model, "classifier", None), None

    def check(self, model: nn.Module) -> None:
        super().check(model)
        for head in self._heads(model):
            if head is not None and not isinstance(head, (nn.Linear, nn.Identity)):
                raise UnsupportedModelError(f"Hugging Face {type(model).__name__}: a {type(head).__name__} classifier "
                                            "is not supported (a Linear one is)")

    def config(self, model: nn.Module) -> ViTConfig:
        trunk = self.trunk(model)
        head, dist = self._heads(model)
        pooler = getattr(trunk, "pooler", None)
        n_classes, head_type = (head.out_features, "linear") if isinstance(head, nn.Linear) else (0, "linear")
        if head is None and pooler is not None:
            n_classes, head_type = pooler.dense.out_features, "module"
        return self.base_config(model, trunk.embeddings.patch_embeddings.projection,
                                img_size=tuple(trunk.embeddings.patch_embeddings.image_size),
                                n_dist=int(dist is not None), n_reg=int(dist is None), n_classes=n_classes,
                                head_type=head_type)

    def weights(self, model: nn.Module) -> ViTWeights:
        trunk = self.trunk(model)
        emb = trunk.embeddings
        head, dist = self._heads(model)
        token = emb.distillation_token.reshape(-1)
        linear = isinstance(head, nn.Linear)
        pooler = getattr(trunk, "pooler", None)
        proj = emb.patch_embeddings.projection
        return ViTWeights(
            patch_w=proj.weight, patch_b=proj.bias, cls=emb.cls_token.reshape(-1),
            dist=token if dist is not None else None, reg=token[None] if dist is None else None,
            pos_embed=emb.position_embeddings[0], ln_pre=None, blocks=self.blocks(model),
            ln_final=norm_params(trunk.layernorm),
            head_w=head.weight if linear else None, head_b=head.bias if linear else None,
            head_dist_w=dist.weight if linear and dist is not None else None,
            head_dist_b=dist.bias if linear and dist is not None else None,
            head_module=_pooler_head(pooler) if head is None and pooler is not None else None)

    def output_tensor(self, output) -> Tensor:
        return class_token_output(output)

    def reference_output(self, model: nn.Module, images: Tensor) -> Tensor:
        return self.output_tensor(model(pixel_values=images))

    def class_names(self, model: nn.Module) -> list[str] | None:
        head, _ = self._heads(model)
        labels = getattr(model.config, "id2label", None)
        if not isinstance(head, nn.Linear) or not labels:
            return None
        return [str(labels.get(i, labels.get(str(i), i))) for i in range(head.out_features)]

    def site_map(self, model: nn.Module) -> dict:
        from ..sitemaps.hf_dino import hf_deit_sites

        return hf_deit_sites(model)


ADAPTERS = [HFDinov2Adapter(), HFDinov3Adapter(), HFDeiTAdapter()]
