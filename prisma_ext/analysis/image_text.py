"""Image-text patching for CLIP: patch the vision tower between two images, scored against prompts,
or the text tower between two prompts, scored against an image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError, PrismaError
from .backend import TextBackend, TLBackend
from .metrics import clip_score_diff
from .patching import activation_patching
from .results import ResultSet


def image_text_patching(clip, clean, corrupted, texts=None, images: Tensor | None = None,
                        tower: str = "visual", sites=("resid_pre", "attn_out", "mlp_out", "z"),
                        positions="all", **kwargs) -> ResultSet:
    """Activation patching in one CLIP tower with an image-text similarity as the metric.

    tower="visual": `clean`/`corrupted` are images [batch, 3, H, W]; `texts` one or two prompts
    (or token ids). Metric: exp(logit_scale) * (cos(image, text_0) - cos(image, text_1)), or the
    single similarity with one prompt.
    tower="text": `clean`/`corrupted` are prompts (lists of equal length, or token ids) and
    `images` one image [1, 3, H, W] or one per prompt. Metric: exp(logit_scale) * cos(image_i,
    text_i). Prompts are aligned by token position: each clean/corrupted pair must put its
    end-of-text token at the same position (the same token count), else InputError; positions
    default to every token up to the last end-of-text token.
    Other keyword arguments go to `activation_patching` (heads, layers, batch_size, direction,
    normalize, progress). Returns its ResultSet. For another metric on the vision tower, call
    `activation_patching(clip, clean, corrupted, metric)` (e.g. metric=px.ImageTextScore(texts)).
    """
    from ..hooked.clip import HookedCLIP

    if "metric" in kwargs:
        raise InputError("image_text_patching builds its metric from texts (or images); for another metric "
                         "call activation_patching(clip, clean, corrupted, metric), e.g. with "
                         "metric=px.ImageTextScore(texts)")

    if not isinstance(clip, HookedCLIP):
        raise PrismaError(f"image_text_patching needs a HookedCLIP (px.load of a CLIP model), got "
                          f"{type(clip).__name__}")
    if tower == "visual":
        if texts is None:
            raise InputError("tower='visual' needs texts: one or two prompts to score against")
        tokens = texts if isinstance(texts, Tensor) else clip.tokenize(list(texts))
        if tokens.shape[0] not in (1, 2):
            raise InputError(f"tower='visual' takes one or two prompts, got {tokens.shape[0]}")
        with torch.no_grad():
            metric = clip_score_diff(clip.encode_text(tokens), clip.logit_scale.detach().exp().item())
        backend = TLBackend(clip, clip.visual, return_type="embeds")
        return activation_patching(backend, clean, corrupted, metric, sites=sites, positions=positions, **kwargs)
    if tower == "text":
        if images is None:
            raise InputError("tower='text' needs images: the fixed image(s) the prompts are scored against")
        clean_tokens, corrupted_tokens = _tokens(clip, clean), _tokens(clip, corrupted)
        if clean_tokens.shape != corrupted_tokens.shape:
            raise InputError(f"clean and corrupted prompts differ in shape: {tuple(clean_tokens.shape)} vs "
                             f"{tuple(corrupted_tokens.shape)}")
        ends_clean = clip.text.pool_positions(clean_tokens)
        ends_corrupted = clip.text.pool_positions(corrupted_tokens)
        if not torch.equal(ends_clean, ends_corrupted):
            raise InputError(
                "tower='text' aligns prompts by token position, so each clean/corrupted pair needs the same "
                f"number of tokens (end-of-text at the same position); got clean prompts of "
                f"{(ends_clean + 1).tolist()} tokens and corrupted prompts of {(ends_corrupted + 1).tolist()} "
                "(counting start- and end-of-text)")
        n = clean_tokens.shape[0]
        if images.shape[0] not in (1, n):
            raise InputError(f"tower='text' takes one image or one per prompt: {images.shape[0]} images, "
                             f"{n} prompts")
        with torch.no_grad():
            image_embeds = clip.encode_image(images, normalize=True).expand(n, -1)
        scale = clip.logit_scale.detach().exp().item()

        def metric(output: Tensor, examples: Tensor) -> Tensor:
            return scale * (torch.nn.functional.normalize(output, dim=-1) * image_embeds[examples]).sum(-1)

        if positions == "all":
            positions = list(range(int(ends_clean.max()) + 1))
        backend = TextBackend(clip, _base_tokens(clean_tokens, corrupted_tokens, kwargs.get("direction")))
        return activation_patching(backend, clean_tokens, corrupted_tokens, metric, sites=sites,
                                   positions=positions, **kwargs)
    raise PrismaError(f"tower must be 'visual' or 'text', got {tower!r}")


def _tokens(clip, texts) -> Tensor:
    if isinstance(texts, Tensor):
        return texts
    if isinstance(texts, str):
        texts = [texts]
    return clip.tokenize(list(texts) if isinstance(texts, Sequence) else texts)


def _base_tokens(clean: Tensor, corrupted: Tensor, direction) -> Tensor:
    """The tokens the restarted runs pool on: the base run's (both put end-of-text alike)."""
    return corrupted if direction in (None, "denoising") else clean
