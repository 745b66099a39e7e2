"""Image-text patching for CLIP: patch the vision tower between two images, scored against prompts,
or the text tower between two prompts, scored against an image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import InputError, PrismaError
from ..backend import TextBackend
from ..clip_backend import TracedTextBackend, embedding_backend
from ..result import ResultSet
from ..targets import FunctionTarget, ImageTextScore, is_clip_model
from .activation import DEFAULT_SITES, activation_patching


def image_text_patching(clip, clean, corrupted, texts=None, *, images: Tensor | None = None,
                        tower: str = "visual", sites=DEFAULT_SITES, positions="all", batch_size: int | None = None,
                        progress: bool = True, **kwargs: Any) -> ResultSet:
    """Activation patching in one CLIP tower with an image-text similarity as the target.

    tower="visual": `clean`/`corrupted` are images [batch, 3, H, W]; `texts` one or two prompts
    (or token ids). Target: exp(logit_scale) * (cos(image, text_0) - cos(image, text_1)), or the
    single similarity with one prompt (`ImageTextScore(text_0, versus=text_1)`).
    tower="text": `clean`/`corrupted` are prompts (lists of equal length, or token ids) and
    `images` one image [1, 3, H, W] or one per prompt. Target: exp(logit_scale) * cos(image_i,
    text_i). Prompts are aligned by token position: each clean/corrupted pair must put its
    end-of-text token at the same position (the same token count), else InputError; positions
    default to every token up to the last end-of-text token.
    Other keyword arguments go to `activation_patching` (heads, layers, direction, normalize,
    reuse). Returns its ResultSet. For another target on the vision tower, call
    `activation_patching(clip, clean, corrupted, target)` (e.g. target=px.ImageTextScore(texts)).
    """
    if "metric" in kwargs or "target" in kwargs:
        raise InputError("image_text_patching builds its target from texts (or images); for another target "
                         "call activation_patching(clip, clean, corrupted, target), e.g. with "
                         "target=px.ImageTextScore(texts)")
    if not is_clip_model(clip):
        raise PrismaError(f"image_text_patching needs a CLIP model with both towers (px.load of a CLIP model, "
                          f"either backend), got {type(clip).__name__}")
    kwargs.update(sites=sites, batch_size=batch_size, progress=progress)
    if tower == "visual":
        return _visual(clip, clean, corrupted, texts, positions, kwargs)
    if tower == "text":
        return _text(clip, clean, corrupted, images, positions, kwargs)
    raise PrismaError(f"tower must be 'visual' or 'text', got {tower!r}")


def _visual(clip, clean, corrupted, texts, positions, kwargs) -> ResultSet:
    if texts is None:
        raise InputError("tower='visual' needs texts: one or two prompts to score against")
    tokens = texts if isinstance(texts, Tensor) else clip.tokenize([texts] if isinstance(texts, str) else list(texts))
    if tokens.shape[0] not in (1, 2):
        raise InputError(f"tower='visual' takes one or two prompts, got {tokens.shape[0]}")
    scale = clip.logit_scale.detach().exp().item()
    target = ImageTextScore(tokens[:1], versus=tokens[1:] if tokens.shape[0] == 2 else None, scale=scale)
    backend = embedding_backend(clip, "image_text_patching")  # the vision tower, output its embedding
    return activation_patching(backend, clean, corrupted, target, positions=positions, **kwargs)


def _text(clip, clean, corrupted, images, positions, kwargs) -> ResultSet:
    if images is None:
        raise InputError("tower='text' needs images: the fixed image(s) the prompts are scored against")
    clean_tokens, corrupted_tokens = _tokens(clip, clean), _tokens(clip, corrupted)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise InputError(f"clean and corrupted prompts differ in shape: {tuple(clean_tokens.shape)} vs "
                         f"{tuple(corrupted_tokens.shape)}")
    backend = _text_backend(clip, _base_tokens(clean_tokens, corrupted_tokens, kwargs.get("direction")))
    text = backend.vit  # the text tower's HookedTextTransformer (its pooling rule)
    ends_clean = text.pool_positions(clean_tokens)
    ends_corrupted = text.pool_positions(corrupted_tokens)
    if not torch.equal(ends_clean, ends_corrupted):
        raise InputError(
            "tower='text' aligns prompts by token position, so each clean/corrupted pair needs the same "
            f"number of tokens (end-of-text at the same position); got clean prompts of "
            f"{(ends_clean + 1).tolist()} tokens and corrupted prompts of {(ends_corrupted + 1).tolist()} "
            "(counting start- and end-of-text)")
    n = clean_tokens.shape[0]
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"tower='text' takes images [n, channels, H, W] (one, or one per prompt), got {got}")
    if images.shape[0] not in (1, n):
        raise InputError(f"tower='text' takes one image or one per prompt: {images.shape[0]} images, "
                         f"{n} prompts")
    with torch.no_grad():
        image_embeds = clip.encode_image(images, normalize=True).expand(n, -1)
    scale = clip.logit_scale.detach().exp().item()

    def similarity(output: Tensor, rows: Tensor) -> Tensor:
        return scale * (torch.nn.functional.normalize(output, dim=-1) * image_embeds[rows]).sum(-1)

    if isinstance(positions, str) and positions == "all":
        positions = list(range(int(ends_clean.max()) + 1))
    return activation_patching(backend, clean_tokens, corrupted_tokens, FunctionTarget(similarity, per_image=True),
                               positions=positions, **kwargs)


def _text_backend(clip, tokens: Tensor):
    """The text tower's backend on `tokens`: `TextBackend` (a HookedCLIP), `TracedTextBackend`
    (a TracedCLIP) or `RemoteTextBackend` (a remote one)."""
    import sys

    from ...hooked.clip import HookedCLIP

    if isinstance(clip, HookedCLIP):
        return TextBackend(clip, tokens)
    remote = sys.modules.get("prisma_ext.traced.remote")  # not imported: clip cannot be a remote model
    if remote is not None and isinstance(clip, remote.RemoteTracedCLIP):
        from ..backend_remote import RemoteTextBackend

        return RemoteTextBackend(clip, tokens)
    return TracedTextBackend(clip, tokens)


def _tokens(clip, texts) -> Tensor:
    if isinstance(texts, Tensor):
        return texts
    if isinstance(texts, str):
        texts = [texts]
    return clip.tokenize(list(texts) if isinstance(texts, Sequence) else texts)


def _base_tokens(clean: Tensor, corrupted: Tensor, direction) -> Tensor:
    """The tokens the restarted runs pool on: the base run's (both put end-of-text alike)."""
    return corrupted if direction in (None, "denoising") else clean
