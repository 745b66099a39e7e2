"""Tokenising prompts for a CLIP text tower, with a warning where a prompt is cut short."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import InputError


class PromptTokenizer:
    """Wraps a tokenizer callable `fn(texts, context_length=...) -> LongTensor [n, context]`
    (open_clip's tokenizers have this form). Prompts longer than the context are truncated the
    way the source tokenizer truncates them (CLIP keeps the end-of-text token last), with a
    `UserWarning` naming them."""

    def __init__(self, fn: Callable[..., Tensor], context_length: int, pad_id: int = 0):
        self.fn, self.context_length, self.pad_id = fn, context_length, pad_id

    def __call__(self, texts: Sequence[str]) -> Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise InputError("no prompts given: expected a non-empty list of strings")
        if not all(isinstance(t, str) for t in texts):
            raise InputError("prompts must be strings")
        tokens = self.fn(texts, context_length=self.context_length)
        lengths = (self.fn(texts, context_length=4 * self.context_length) != self.pad_id).sum(-1)
        long = [i for i, n in enumerate(lengths.tolist()) if n > self.context_length]
        if long:
            shown = ", ".join(repr(texts[i][:40]) for i in long[:3])
            warnings.warn(f"{len(long)} prompt(s) longer than the context of {self.context_length} "
                          f"tokens were truncated: {shown}", UserWarning, stacklevel=3)
        return tokens.to(torch.long)
