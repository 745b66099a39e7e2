"""What the Hugging Face adapters share: recognising transformers classes by name, refusing
their relatives with the supported list, and the activation names of transformers configs."""

from __future__ import annotations

from torch import nn

from .base import Adapter

# transformers' `hidden_act` -> our activation names
HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
           "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}


def is_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


class TransformersAdapter(Adapter):
    """An adapter for the transformers classes named in `classes`; it refuses the other
    transformers classes whose names start with `family` ("" for all), naming the supported ones."""

    classes: tuple[str, ...] = ()
    family: str = ""

    def matches(self, module: nn.Module) -> bool:
        return is_transformers(module) and type(module).__name__ in self.classes

    def refusal(self, module: nn.Module) -> str | None:
        kind = type(module).__name__
        if is_transformers(module) and kind.startswith(self.family):
            return f"Hugging Face {kind} is not supported; supported: {', '.join(self.classes)}"
        return None
