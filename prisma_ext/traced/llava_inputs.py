"""LLaVA inputs: prompts with the image's tokens in place, and invoke batching.

`LlavaForConditionalGeneration.forward(input_ids, pixel_values, attention_mask, ...)` reads one
image per block of `n_image_tokens` copies of `image_token_id` in `input_ids`: the projected image
features are scattered into those positions of the language model's input. A processor writes
`<image>` once and expands it; `build_inputs` does the same on token ids, with the id and count
taken from the model's config (no processor, no download).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from .clip_inputs import ClipInputs

Prompt = Sequence[int] | Sequence[Sequence[int]] | Tensor


def n_image_tokens(model: nn.Module) -> int:
    """How many tokens one image becomes in the language model's input: the tower's tokens
    (patches, plus CLIP's class token), less one under `vision_feature_select_strategy="default"`
    (as `LlavaProcessor` counts them)."""
    tower = model.model.vision_tower
    cfg = tower.config
    n = (cfg.image_size // cfg.patch_size) ** 2 + (1 if type(tower).__name__ == "CLIPVisionModel" else 0)
    return n - (1 if model.config.vision_feature_select_strategy == "default" else 0)


def expand_prompt(prompt: Prompt, image_token_id: int, n_tokens: int) -> Tensor:
    """Token ids [rows, seq] with each prompt's one `image_token_id` (the placeholder) replaced by
    `n_tokens` copies; a prompt that already holds exactly `n_tokens` copies in a row is kept.
    `prompt`: ids [seq] (one prompt) or [rows, seq], as a list or an integer tensor."""
    if isinstance(prompt, str):
        raise InputError(f"a LLaVA prompt is token ids: tokenize {prompt[:40]!r} with the checkpoint's tokenizer and "
                         f"put the image token {image_token_id} once where the image goes")
    try:
        ids = prompt if isinstance(prompt, Tensor) else torch.tensor(prompt)
    except (TypeError, ValueError) as err:
        raise InputError(f"a LLaVA prompt is token ids [seq] or [rows, seq] of one length, got {prompt!r} "
                         f"({err})") from None
    if ids.dtype not in (torch.int64, torch.int32) or ids.ndim not in (1, 2) or ids.shape[-1] == 0:
        raise InputError(f"a LLaVA prompt is token ids [seq] or [rows, seq] (integers) holding the image token "
                         f"{image_token_id} once, got {tuple(ids.shape)} {ids.dtype}")
    rows = []
    for row in ids.reshape(-1, ids.shape[-1]).long().cpu():
        where = (row == image_token_id).nonzero().flatten()
        if len(where) == n_tokens and (n_tokens == 1 or int(where[-1] - where[0]) == n_tokens - 1):
            rows.append(row)
            continue
        if len(where) != 1:
            raise InputError(f"a LLaVA prompt holds the image token {image_token_id} once (where the image goes; it "
                             f"becomes the image's {n_tokens} tokens) or {n_tokens} times in a row, got it "
                             f"{len(where)} times in {row.tolist()}")
        at = int(where[0])
        rows.append(torch.cat([row[:at], row.new_full((n_tokens,), image_token_id), row[at + 1:]]))
    if len({len(r) for r in rows}) > 1:
        raise InputError(f"the prompts have different lengths ({sorted({len(r) for r in rows})}); LLaVA batches "
                         "prompts of one length: pad them (with an attention_mask) yourself")
    return torch.stack(rows)


def build_inputs(model: nn.Module, images: Tensor, prompt: Prompt) -> dict[str, Tensor]:
    """`input_ids` [batch, seq], `pixel_values` = images [batch, C, H, W] and `attention_mask`
    (ones) for the LLaVA `model`: one image per prompt; one prompt is used for every image."""
    ids = expand_prompt(prompt, model.config.image_token_id, n_image_tokens(model))
    batch = images.shape[0]
    if ids.shape[0] not in (1, batch):
        raise InputError(f"{ids.shape[0]} prompts for {batch} images: give one prompt, or one per image")
    ids = ids.expand(batch, -1).contiguous().to(images.device)
    return dict(input_ids=ids, pixel_values=images, attention_mask=torch.ones_like(ids))


class LlavaInputs(ClipInputs):
    """`ClipInputs` over LLaVA's forward (`pixel_values`, `input_ids`): an invoke's rows are its
    images (else its prompts), several invokes concatenate every tensor argument; each image needs
    its block of image tokens in the prompts."""

    def __init__(self, module: nn.Module, check_images: Callable[[Tensor], None],
                 check_tokens: Callable[[Tensor], None]):
        super().__init__(module, check_images, check_tokens)
        self.image_token_id = module.config.image_token_id
        self.n_image_tokens = n_image_tokens(module)

    def rows(self, args: tuple, kwargs: dict) -> int:
        named = self.bind(args, kwargs)
        images, ids = named.get(self.image), named.get(self.text)
        if isinstance(images, Tensor) and isinstance(ids, Tensor) and ids.ndim == 2:
            want = images.shape[0] * self.n_image_tokens if images.ndim == 4 else None
            got = int((ids == self.image_token_id).sum())
            if want is not None and got != want:
                raise InputError(
                    f"{images.shape[0]} image(s) need {want} image tokens (id {self.image_token_id}, "
                    f"{self.n_image_tokens} an image) in input_ids, got {got}: build the inputs with "
                    "model.inputs(images, prompt), whose prompt holds the image token once")
        return super().rows(args, kwargs)

    def _names(self) -> str:
        return "input_ids= (with the image tokens), pixel_values= and attention_mask="

    def has_images(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        return self.image in self.bind(args, kwargs)
