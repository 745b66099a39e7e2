"""The nnsight backend of a TracedCLIP: its vision tower, as `TLBackend(clip, clip.visual)` is a
HookedCLIP's on the TL backend.

Methods read and edit the tower's sites by their unprefixed names (`blocks.3.hook_resid_post` is
the TracedCLIP's `visual.blocks.3.hook_resid_post`). Each run is one trace of the source's own
image encoder (open_clip `encode_image`, Hugging Face `get_image_features`), so the text tower
does not run. The output is the image embedding [batch, d_proj] (site `hook_image_embed`), or,
once `clip.use_zero_shot_head(...)` installed class embeddings, the zero-shot logits
[batch, n_classes] = embed @ classes.T that a HookedCLIP's `visual` gives with the same head.
Weight-level quantities (W_O, the readout, the projection) come from an unprocessed conversion
of the tower (`tower_copy`) carrying the same head.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

from ..errors import InputError, PrismaError
from .backend_base import CLIP_OUTPUT as OUTPUT
from .backend_base import CLIP_RETURN_TYPES as RETURN_TYPES
from .backend_base import Backend
from .backend_nnsight import NNsightBackend, _tensor_output, cached_conversion, weights_copy
from .backend_tl import TextTower, TLBackend
from .clip_tower import EmbeddingOutput, TowerSites


class _TracedTower(TowerSites, NNsightBackend):
    """One tower of a TracedCLIP (`tower`: "visual" or "text"): its sites by their unprefixed
    names, each run one trace of the source's own encoder of that tower."""

    def _open(self, inputs: Tensor):
        model = self.model
        return model.trace(fn=model.encoder(self.tower), **model.tower_inputs(self.tower, inputs))


class TracedCLIPBackend(EmbeddingOutput, _TracedTower):
    """A TracedCLIP's vision tower (see the module docstring). `return_type`: "logits" (the
    zero-shot logits once a head is installed, else the embedding) or "embeds"."""

    def __init__(self, model: Any, return_type: str = "logits"):
        if return_type not in RETURN_TYPES:
            raise PrismaError(f"return_type must be one of {RETURN_TYPES} on a traced CLIP, got {return_type!r}")
        check_local(model)
        self.head = model.zero_shot_head
        super().__init__(model, tower_copy(model, self.head))
        self.return_type = return_type

    def _output(self, tracer, seen: dict[str, Tensor]) -> Tensor:
        return self.from_embedding(seen[OUTPUT])


class TracedTextBackend(TextTower, _TracedTower):
    """A TracedCLIP's text tower on token ids (nnsight), as `TextBackend` is a HookedCLIP's: runs
    take token ids [batch, pos] (a trace of the source's own text encoder), sites are the text
    tower's unprefixed names, the output is the text embedding [batch, d_proj]; `tokens` are the
    base run's (as `TextBackend`'s, they say where the tower pools). `vit` is an unprocessed
    conversion of the text tower (`text_copy`), for its config and pooling rule."""

    tower = "text"

    def __init__(self, model: Any, tokens: Tensor):
        check_local(model)
        if model.text_cfg is None:
            raise InputError(f"{type(model._module).__name__} has no text tower")
        super().__init__(model, text_copy(model))
        self.tokens = tokens

    def _output(self, tracer, seen: dict[str, Tensor]) -> Tensor:
        return _tensor_output(self.model, tracer.result)  # the encoder's embedding [batch, d_proj]


def text_copy(model: Any):
    """The text tower's HookedTextTransformer (unprocessed), built once per model and weights
    (`cached_conversion`, as `weights_copy` builds the vision tower's)."""
    from ..hooked.text import HookedTextTransformer

    module, adapter = model._module, model.adapter
    return cached_conversion(model, "_px_text_copy", lambda: HookedTextTransformer.from_weights(
        adapter.text_config(module), adapter.text_weights(module)))


def check_local(model: Any) -> None:
    """PrismaError for a model whose traces run remotely or whose weights are not here."""
    remote = model.__dict__.get("default_remote")
    if remote:
        raise PrismaError(
            f"{type(model).__name__} runs its traces remotely (remote={remote!r}): its backend is the remote one "
            "(Backend.of(model), backend_remote); this one traces here and reads the weights locally")
    if any(p.is_meta for p in model._module.parameters()):
        raise PrismaError(f"{type(model).__name__} holds no weights here (meta device): the analysis methods "
                          "need real weights; load it with backend='nnsight' and no remote=")


def tower_copy(model: Any, head: Any):
    """The vision tower's HookedViT (`weights_copy`, cached) with `head` (a `ZeroShotHead` or
    None) as its unembedding, as `use_zero_shot_head` sets it on a HookedCLIP's `visual`."""
    vit = weights_copy(model)
    if vit.__dict__.get("_px_zero_shot") is head:
        return vit
    if head is None:  # a head to drop: a fresh copy
        model.__dict__.pop("_px_weights_copy", None)
        vit = weights_copy(model)
    else:  # replaces any head there was
        vit.set_unembed(head.weight.to(device=vit.cfg.device, dtype=vit.cfg.dtype), head.class_names)
    vit.__dict__["_px_zero_shot"] = head
    return vit


def traced_clip_backend(model: Any) -> Backend:
    """`Backend.of(traced_clip)`: the vision tower of a CLIP; a vision tower on its own
    (CLIPVisionModel, HookedViT's names) is traced as a ViT."""
    if model.towers == {"visual": ""}:
        check_local(model)
        return NNsightBackend(model)
    return TracedCLIPBackend(model)


def embedding_backend(clip: Any, method: str) -> Backend:
    """The backend whose output is a CLIP's image embedding: a HookedCLIP's vision tower (TL) or a
    TracedCLIP's (nnsight); InputError naming `method` for anything else."""
    from ..hooked.clip import HookedCLIP

    if isinstance(clip, HookedCLIP):
        return TLBackend(clip, clip.visual, return_type="embeds")
    traced = sys.modules.get("prisma_ext.traced.clip")  # not imported: clip cannot be a TracedCLIP
    if traced is not None and isinstance(clip, traced.TracedCLIP):
        if clip.text_cfg is None:
            raise InputError(f"{method} scores a CLIP image embedding against text and needs both towers; "
                             f"got a vision tower alone ({type(clip._module).__name__})")
        remote = sys.modules.get("prisma_ext.traced.remote")
        if remote is not None and isinstance(clip, remote.RemoteTracedCLIP):
            from .backend_remote import RemoteCLIPBackend

            return RemoteCLIPBackend(clip, return_type="embeds")
        return TracedCLIPBackend(clip, return_type="embeds")
    raise InputError(f"{method} splits a CLIP image embedding and needs a HookedCLIP or a TracedCLIP (a CLIP "
                     "model from px.load('open_clip:...'), px.load('hf:...') or px.load('builtin:shapes-clip'), "
                     f"backend 'tl' or 'nnsight'), got {type(clip).__name__}")
