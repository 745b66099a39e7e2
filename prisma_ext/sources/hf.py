"""`hf:REPO_OR_FOLDER`: a Hugging Face checkpoint, by repo id or `save_pretrained` folder."""

from __future__ import annotations

from torch import nn

from ..errors import PrismaError, UnsupportedModelError
from . import Source, is_path


class HFSource(Source):
    prefix = "hf"

    def build(self, name, pretrained, kwargs) -> nn.Module:
        from transformers import AutoConfig, CLIPModel, CLIPVisionModel, ViTForImageClassification, ViTModel

        source = str(pretrained) if is_path(pretrained) else name
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise PrismaError(f"could not read the config of hf:{source} ({type(err).__name__}: {err}). "
                              "Offline? Save the model with save_pretrained and pass its folder") from err
        vit_model = "ViTModel" in (getattr(config, "architectures", None) or [])
        classes = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModel,
                   "vit": ViTModel if vit_model else ViTForImageClassification}
        if config.model_type == "vit" and vit_model:
            kwargs = dict(kwargs, add_pooling_layer=False)  # its pooler (dense + tanh) has no HookedViT part
        if config.model_type not in classes:
            raise UnsupportedModelError(f"hf:{name}: model type {config.model_type!r} is not supported; "
                                        f"supported: {', '.join(classes)}")
        cls = classes[config.model_type]
        try:
            module = cls.from_pretrained(source, **kwargs) if pretrained else cls(config)
        except (OSError, ValueError) as err:
            raise PrismaError(f"could not load the weights of hf:{source} ({type(err).__name__}: {err})") from err
        module.eval()
        module._prisma_source = f"hf:{name}"
        return module


SOURCE = HFSource()
