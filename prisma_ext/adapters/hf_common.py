"""What the Hugging Face adapters share: recognising transformers classes by name, refusing
their relatives with the list of every supported class, and the activation names of configs."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Adapter, CLIPAdapter

# transformers' `hidden_act` -> our activation names
HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
           "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}
SUPPORTED: list[str] = []  # every transformers class some adapter below converts
DEFAULT_CLASSES: dict[str, str] = {}  # config.model_type -> the class `hf:` builds when the config names none


def is_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


class TransformersAdapter(Adapter):
    """An adapter for the transformers classes named in `classes`; it refuses the other
    transformers classes whose names start with `family` ("" for all), naming every supported one."""

    classes: tuple[str, ...] = ()
    family: str = ""
    model_types: dict[str, str] = {}  # config.model_type -> default class, for `hf:` sources

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SUPPORTED.extend(c for c in cls.__dict__.get("classes", ()) if c not in SUPPORTED)
        DEFAULT_CLASSES.update(cls.__dict__.get("model_types", {}))

    def matches(self, module: nn.Module) -> bool:
        return is_transformers(module) and type(module).__name__ in self.classes

    def refusal(self, module: nn.Module) -> str | None:
        kind = type(module).__name__
        if is_transformers(module) and kind.startswith(self.family):
            return f"Hugging Face {kind} is not supported; supported: {', '.join(sorted(SUPPORTED))}"
        return None


def class_token_output(output):
    """A ViT-style transformers output as one tensor: `logits`; else the pooler's output; else
    (no pooler) the final-normalised class token `last_hidden_state[:, 0]`."""
    if getattr(output, "logits", None) is not None:
        return output.logits
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output.last_hidden_state[:, 0]


def class_for(config) -> str | None:
    """The transformers class `hf:` builds for a config: the first class its `architectures` name
    that an adapter converts (else the first it names, to be refused by name), else the default
    for its `model_type`; None if none."""
    named = getattr(config, "architectures", None) or []
    for name in named:
        if name in SUPPORTED:
            return name
    if named:  # a class no adapter converts: build it, so that loading it names the refusal
        return named[0]
    return DEFAULT_CLASSES.get(config.model_type)


class TransformersCLIPAdapter(TransformersAdapter, CLIPAdapter):
    """A transformers CLIP-like adapter (class matching above, the CLIP contract of `CLIPAdapter`)."""
