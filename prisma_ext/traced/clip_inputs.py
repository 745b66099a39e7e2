"""CLIP invokes: images and/or token ids, named as the source's forward names them, batched.

open_clip's `CLIP.forward(image, text)`, Hugging Face's `CLIPModel.forward(input_ids,
pixel_values, ...)` and `CLIPVisionModel.forward(pixel_values)` take their inputs under different
names. `ClipInputs` reads those names from the forward's signature, binds an invoke's
arguments to them, validates images and token ids, and concatenates several invokes into one
forward call. nnsight gives each invoke one row range of every activation, so when an invoke
passes both images and prompts they are pairs (as many of each) once a trace has several invokes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from nnsight.intervention.batching import Batcher
from torch import Tensor, nn

from ..errors import InputError

IMAGE_NAMES = ("image", "pixel_values", "images", "x")
TEXT_NAMES = ("text", "input_ids", "tokens")


def check_tokens(tokens: Any, vocab_size: int, context_length: int) -> None:
    """InputError unless `tokens` is an integer tensor [batch, pos] of ids the text tower takes."""
    if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise InputError(f"expected token ids as an integer tensor [batch, pos] (tokenize prompts first), "
                         f"got {type(tokens).__name__}{' ' + str(tokens.dtype) if isinstance(tokens, Tensor) else ''}")
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise InputError(f"expected token ids of shape [batch, pos], got {tuple(tokens.shape)}")
    if tokens.shape[1] > context_length:
        raise InputError(f"{tokens.shape[1]} tokens exceed the context length {context_length}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise InputError(f"token ids must lie in [0, {vocab_size}), got [{int(tokens.min())}, "
                         f"{int(tokens.max())}]")


class ClipInputs:
    """The image and text argument names of `module.forward`, and invoke batching over them.

    `check_images(images)` / `check_tokens(tokens)` validate an invoke's inputs (either may be
    None when the model has no such tower).
    """

    def __init__(self, module: nn.Module, check_images: Callable[[Tensor], None] | None,
                 check_text: Callable[[Tensor], None] | None):
        self.signature = inspect.signature(type(module).forward)
        params = list(self.signature.parameters)
        self.image = next((n for n in IMAGE_NAMES if n in params), None) if check_images else None
        self.text = next((n for n in TEXT_NAMES if n in params), None) if check_text else None
        self._checks = {self.image: check_images, self.text: check_text}

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """An invoke's arguments by name (only those it passes)."""
        try:
            bound = self.signature.bind_partial(None, *args, **kwargs)
        except TypeError as err:
            raise InputError(f"this CLIP's forward takes {self._names()}: {err}") from None
        named = dict(bound.arguments)
        named.pop(next(iter(self.signature.parameters)))  # self
        for key in list(named):  # **kwargs of HF forwards
            if self.signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
                named.update(named.pop(key))
        return {k: v for k, v in named.items() if v is not None}

    def _names(self) -> str:
        names = [n for n in (self.image, self.text) if n]
        return " and ".join(f"{n}=" for n in names) or "its forward's arguments"

    def rows(self, args: tuple, kwargs: dict) -> int:
        """How many rows an invoke adds: its images (else its prompts); 0 for an empty invoke."""
        named = self.bind(args, kwargs)
        counts = []
        for key in (self.image, self.text):
            if key is not None and key in named:
                self._checks[key](named[key])
                counts.append(int(named[key].shape[0]))
        if not counts and named:
            raise InputError(f"an invoke needs {self._names()} (images [batch, channels, H, W] and/or "
                             f"token ids [batch, pos]); got only {sorted(named)}")
        return counts[0] if counts else 0

    def concat(self, invokes: list[tuple[tuple, dict]]) -> tuple[tuple, dict]:
        """One forward call's (args, kwargs) from several invokes: every tensor argument
        concatenated along dim 0 in invoke order, every other argument equal across invokes."""
        if len(invokes) == 1:
            return invokes[0]
        bound = [self.bind(args, kwargs) for args, kwargs in invokes]
        keys = set(bound[0])
        for i, named in enumerate(bound):
            if set(named) != keys:
                raise InputError(f"invokes in one trace run as one batch, so they must pass the same "
                                 f"inputs: invoke 0 passes {sorted(keys)}, invoke {i} {sorted(named)}")
            tensors = [k for k in (self.image, self.text) if k in named]
            if len(tensors) == 2 and named[tensors[0]].shape[0] != named[tensors[1]].shape[0]:
                raise InputError(
                    f"with several invokes, each invoke's images and prompts are pairs (each invoke owns "
                    f"one row range of both towers): invoke {i} has {named[tensors[0]].shape[0]} images "
                    f"and {named[tensors[1]].shape[0]} prompts")
        merged = {}
        for key in bound[0]:
            merged[key] = _merge(key, [named[key] for named in bound])
        return (), merged


def _merge(key: str, values: list[Any]) -> Any:
    first = values[0]
    if not isinstance(first, Tensor):
        if any(v is not first and v != first for v in values[1:]):
            raise InputError(f"invokes in one trace run as one batch: {key}= must be the same in every invoke")
        return first
    for i, t in enumerate(values[1:], 1):
        if not isinstance(t, Tensor) or t.shape[1:] != first.shape[1:] or t.dtype != first.dtype \
                or t.device != first.device:
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise InputError(
                f"invokes in one trace run as one batch, so their {key} must match: invoke 0 has "
                f"{tuple(first.shape)} {first.dtype} on {first.device}, invoke {i} has {got} "
                "(only the batch size may differ)")
    return torch.cat(values, dim=0)


class ScalarSafeBatcher(Batcher):
    """nnsight's row scoping, passing 0-d tensors through whole (open_clip's forward returns
    `logit_scale.exp()`, which the base batcher would index by row)."""

    def _narrow_tensor(self, tensor: Tensor, group: list) -> Tensor:
        return tensor if tensor.ndim == 0 else super()._narrow_tensor(tensor, group)

    def _widen_tensor(self, full: Tensor, group: list, edited: Tensor) -> Tensor:
        return edited if full.ndim == 0 else super()._widen_tensor(full, group, edited)
