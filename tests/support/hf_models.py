"""Small random Hugging Face models of every class the HF adapters convert, for the parity census:
each builder gives a model with every parameter randomised and the class's non-default flags."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from torch import nn
from transformers import (
    Aimv2VisionConfig,
    CLIPVisionConfig,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    MetaClip2Config,
    Siglip2Config,
    SiglipConfig,
)

from tests.support.models import randomize_

# ---------------------------------------------------------------- DINOv2, DINOv3, DeiT
SMALL = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3)
LABELS = dict(num_labels=5, id2label={i: f"class {i}" for i in range(5)})
CONFIGS = {  # name -> (model class, config, constructor keywords); non-default flags throughout
    "dinov2": (Dinov2Model, Dinov2Config(**SMALL, mlp_ratio=2, image_size=28, patch_size=7, hidden_act="gelu_new"), {}),
    "dinov2_swiglu_no_qkv_bias": (Dinov2Model, Dinov2Config(**SMALL, image_size=32, patch_size=8, use_swiglu_ffn=True,
                                                            qkv_bias=False, layer_norm_eps=1e-5), {}),
    "dinov2_registers": (Dinov2WithRegistersModel, Dinov2WithRegistersConfig(
        **SMALL, mlp_ratio=2, image_size=32, patch_size=8, num_register_tokens=3), {}),
    "dinov2_registers_swiglu": (Dinov2WithRegistersModel, Dinov2WithRegistersConfig(
        **SMALL, image_size=24, patch_size=8, num_register_tokens=1, use_swiglu_ffn=True), {}),
    "dinov3": (DINOv3ViTModel, DINOv3ViTConfig(**SMALL, intermediate_size=96, image_size=32, patch_size=8,
                                               num_register_tokens=2), {}),
    "dinov3_gated_biases_non_square": (DINOv3ViTModel, DINOv3ViTConfig(
        **SMALL, intermediate_size=64, image_size=(32, 24), patch_size=8, use_gated_mlp=True, hidden_act="silu",
        query_bias=False, key_bias=True, proj_bias=False, mlp_bias=False, rope_theta=50.0), {}),
    "deit_teacher_non_square": (DeiTForImageClassificationWithTeacher, DeiTConfig(
        **SMALL, intermediate_size=96, image_size=(32, 24), patch_size=8, qkv_bias=False, **LABELS), {}),
    "deit_classifier": (DeiTForImageClassification, DeiTConfig(
        **SMALL, intermediate_size=96, image_size=32, patch_size=8, hidden_act="quick_gelu", **LABELS), {}),
    "deit_model_pooler": (DeiTModel, DeiTConfig(**SMALL, intermediate_size=96, image_size=32, patch_size=8,
                                                pooler_output_size=40, pooler_act="gelu"), {}),
    "deit_model_bare": (DeiTModel, DeiTConfig(**SMALL, intermediate_size=96, image_size=32, patch_size=8),
                        dict(add_pooling_layer=False)),
}


def small_dino(name: str, seed: int = 0) -> torch.nn.Module:
    """A small model of CONFIGS[name] with every parameter random (layer scales `lambda1` near 1)."""
    cls, config, kw = CONFIGS[name]
    return randomize_(cls(config, **kw).eval(), seed)


# ---------------------------------------------------------------- SigLIP, SigLIP 2, MetaCLIP 2, AIMv2
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=32,
              patch_size=8)
SIGLIP2_VISION = {**{k: v for k, v in VISION.items() if k != "image_size"}, "num_patches": 16}  # a 4x4 grid
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=12)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`randomize_` in eval mode (transformers' `*RMSNorm` weights near one, like every norm's)."""
    return randomize_(model.eval(), seed)


def small_siglip(kind: str, seed: int = 0, **config) -> torch.nn.Module:
    """A small random transformers model of class `kind` (its config from VISION / TEXT and `config`)."""
    cls = getattr(transformers, kind)
    if kind in ("SiglipModel", "Siglip2Model"):
        vision = SIGLIP2_VISION if kind == "Siglip2Model" else VISION
        cfg_cls = Siglip2Config if kind == "Siglip2Model" else SiglipConfig
        cfg = cfg_cls(text_config={**TEXT, "projection_size": 48, **config.pop("text", {})},
                      vision_config={**vision, **config.pop("vision", {})}, **config)
    elif kind == "MetaClip2Model":
        cfg = MetaClip2Config(text_config={**TEXT, "eos_token_id": 7, **config.pop("text", {})},
                              vision_config={**VISION, **config.pop("vision", {})}, projection_dim=24, **config)
    elif kind.endswith("ForImageClassification"):
        v2 = kind.startswith("Siglip2")
        cfg = (Siglip2Config if v2 else SiglipConfig)(
            vision_config={**(SIGLIP2_VISION if v2 else VISION), **config.pop("vision", {})}, num_labels=5,
            id2label={i: f"class {i}" for i in range(5)}, **config)
    elif kind == "Aimv2VisionModel":
        cfg = Aimv2VisionConfig(**{**VISION, **config})
    elif kind.startswith("Siglip2"):
        cfg = cls.config_class(**{**SIGLIP2_VISION, **config})
    elif kind.startswith(("Siglip", "MetaClip2")):
        cfg = cls.config_class(**{**VISION, **(dict(projection_dim=24) if "Projection" in kind else {}), **config})
    else:  # CLIPVisionModelWithProjection
        cfg = CLIPVisionConfig(**VISION, projection_dim=24, **config)
    return randomized(cls(cfg), seed)




def _vit(cls_name: str, **kw) -> nn.Module:
    import transformers
    from transformers import ViTConfig

    config = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                       image_size=32, patch_size=8, num_labels=5)
    return randomize_(getattr(transformers, cls_name)(config, **kw).eval(), seed=3)


def _clip(cls_name: str) -> nn.Module:
    import transformers

    from tests.support.clip_models import small_hf_clip

    model = small_hf_clip(seed=4)
    if cls_name == "CLIPModel":
        return model
    vision = getattr(transformers, cls_name)(model.config.vision_config)
    return randomize_(vision.eval(), seed=4)


# a name for the census -> a builder of a small random model of that class
HF_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "ViTForImageClassification": lambda: _vit("ViTForImageClassification"),
    "ViTModel": lambda: _vit("ViTModel"),
    "ViTModel (add_pooling_layer=False)": lambda: _vit("ViTModel", add_pooling_layer=False),
    "CLIPModel": lambda: _clip("CLIPModel"),
    "CLIPVisionModel": lambda: _clip("CLIPVisionModel"),
    "CLIPVisionModelWithProjection": lambda: small_siglip("CLIPVisionModelWithProjection"),
    "Dinov2Model": lambda: small_dino("dinov2_swiglu_no_qkv_bias"),
    "Dinov2WithRegistersModel": lambda: small_dino("dinov2_registers"),
    "DINOv3ViTModel": lambda: small_dino("dinov3_gated_biases_non_square"),
    "DeiTForImageClassificationWithTeacher": lambda: small_dino("deit_teacher_non_square"),
    "DeiTForImageClassification": lambda: small_dino("deit_classifier"),
    "DeiTModel": lambda: small_dino("deit_model_pooler"),
    **{kind: (lambda k=kind: small_siglip(k)) for kind in (
        "SiglipModel", "SiglipVisionModel", "Siglip2Model", "Siglip2VisionModel", "SiglipForImageClassification",
        "Siglip2ForImageClassification", "MetaClip2Model", "MetaClip2VisionModel",
        "MetaClip2VisionModelWithProjection", "Aimv2VisionModel")},
    "Aimv2Model": lambda: randomized(transformers.Aimv2Model(transformers.Aimv2Config(
        text_config=TEXT, vision_config=VISION))),
    "CLIPTextModel": lambda: randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT))),
    "Dinov2ForImageClassification": lambda: randomized(transformers.Dinov2ForImageClassification(
        Dinov2Config(**SMALL, image_size=32, patch_size=8, **LABELS))),
    "BeitModel": lambda: randomized(transformers.BeitModel(transformers.BeitConfig(
        **SMALL, intermediate_size=96, image_size=32, patch_size=8))),
}
