"""`hf:REPO_OR_FOLDER`: a Hugging Face checkpoint, by repo id or `save_pretrained` folder."""

from __future__ import annotations

from torch import nn

from ..errors import PrismaError, UnsupportedModelError
from . import Source, is_path


class HFSource(Source):
    prefix = "hf"

    def build(self, name, pretrained, kwargs) -> nn.Module:
        import transformers
        from transformers import AutoConfig

        from ..adapters.hf_common import DEFAULT_CLASSES, class_for
        from ..adapters.registry import builtin_adapters

        builtin_adapters()  # every HF adapter registers its classes
        source = str(pretrained) if is_path(pretrained) else name
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise PrismaError(f"could not read the config of hf:{source} ({type(err).__name__}: {err}). "
                              "Offline? Save the model with save_pretrained and pass its folder") from err
        kind = class_for(config)
        if kind is None:
            raise UnsupportedModelError(f"hf:{name}: model type {config.model_type!r} is not supported; "
                                        f"supported: {', '.join(sorted(DEFAULT_CLASSES))}")
        cls = getattr(transformers, kind)
        if kind == "ViTModel" and "add_pooling_layer" not in kwargs:
            kwargs = dict(kwargs, add_pooling_layer=False)  # its pooler (dense + tanh) has no HookedViT part
        try:
            module = cls.from_pretrained(source, **kwargs) if pretrained else cls(config, **kwargs)
        except (OSError, ValueError) as err:
            raise PrismaError(f"could not load the weights of hf:{source} ({type(err).__name__}: {err})") from err
        module.eval()
        module._prisma_source = f"hf:{name}"
        return module


SOURCE = HFSource()
