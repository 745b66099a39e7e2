"""Small random Hugging Face models of every class the HF adapters convert, for the parity census:
each builder gives a model with every parameter randomised and the class's non-default flags."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tests.support.models import randomize_


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
}
