"""What a TracedCLIP offers beyond its sites, as HookedCLIP does: the prompt tokenizer, image and
text embeddings (each one trace of the source's own tower: open_clip's `encode_image` /
`encode_text`, Hugging Face's `get_image_features` / `get_text_features`), zero-shot class
embeddings, and a zero-shot head for the analysis layer's vision tower.

    clip = px.load(open_clip_model, backend="nnsight")
    text = clip.encode_text(["a red circle", "a blue ring"])     # [2, d_proj], traced
    clip.use_zero_shot_head(["circle", "ring"], ["a photo of a {}."])
    px.logit_lens(clip, images)                                  # explains the zero-shot logits
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._state import eval_mode, lock_of
from ..errors import InputError, PrismaError

# tower -> the source's method that embeds it, by library (the first the module has)
ENCODERS = {"visual": ("encode_image", "get_image_features"), "text": ("encode_text", "get_text_features")}


@dataclass(frozen=True)
class ZeroShotHead:
    """Class text embeddings read from the image embedding: logits = embed @ weight.T."""

    weight: Tensor  # [n_classes, d_proj]
    class_names: list[str]


class ClipEncoders:
    """Mixin of `TracedCLIP`: tokenizer, encoders and the zero-shot head (HookedCLIP's API)."""

    # ------------------------------------------------------------------ running one tower
    def encoder(self, tower: str) -> str:
        """The name of the source's method that embeds `tower` ("visual" or "text")."""
        inputs = self._inputs
        key = inputs.image if tower == "visual" else inputs.text
        module = self._module
        name = next((n for n in ENCODERS[tower] if callable(getattr(module, n, None))), None)
        if key is None or name is None:
            what = "image" if tower == "visual" else "text"
            raise PrismaError(f"{type(module).__name__} has no {what} embedding to compute (a tower on its own, "
                              f"or a source without {' or '.join(ENCODERS[tower])})")
        return name

    def tower_inputs(self, tower: str, value: Tensor) -> dict[str, Tensor]:
        """The keyword arguments that hand `value` (images or token ids) to the tower's encoder."""
        self.encoder(tower)
        return {self._inputs.image if tower == "visual" else self._inputs.text: value}

    def _embed(self, tower: str, value: Tensor) -> Tensor:
        """One trace of the source's encoder of `tower` on `value`: its embedding [n, d_proj]."""
        from nnsight import save

        name, kwargs = self.encoder(tower), self.tower_inputs(tower, value)
        module = self._module
        with lock_of(module), eval_mode(module):
            with self.trace(fn=name, **kwargs) as tracer:
                if tower == "visual":  # the image embedding site (the first item where a tower returns tokens too)
                    prefix = self.towers["visual"]
                    out = save(self.site(f"{prefix}hook_image_embed"))
                else:
                    out = save(tracer.result)
        out = self.adapter.output_tensor(out)
        if not isinstance(out, Tensor):
            raise PrismaError(f"{type(module).__name__}.{name} returned {type(out).__name__}, not an embedding tensor")
        return out

    # ------------------------------------------------------------------ text
    @property
    def tokenizer(self) -> Any:
        """The prompt tokenizer (`PromptTokenizer`, built on first use as HookedCLIP's), or None
        when the source's is unknown (then pass token ids)."""
        from ..hooked.tokenize import PromptTokenizer

        tok = self.__dict__.get("_px_tokenizer", ...)
        if tok is ...:
            tok = self.adapter.tokenizer(self._module) if self.text_cfg is not None else None
        if tok is not None and not isinstance(tok, PromptTokenizer):  # a factory: build it now
            tok = tok()
        self.__dict__["_px_tokenizer"] = tok
        return tok

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Prompts -> token ids [n, context_length] (long prompts truncated with a warning)."""
        tok = self.tokenizer
        if tok is None:
            raise PrismaError(f"no tokenizer is available for {type(self._module).__name__}; pass token ids")
        return tok(texts).to(self.input_device)

    def encode_text(self, texts: Sequence[str] | Tensor, normalize: bool = False) -> Tensor:
        """Prompts (or token ids [n, pos]) -> text embeddings [n, d_proj], traced (eval mode)."""
        tokens = texts if isinstance(texts, Tensor) else self.tokenize(texts)
        out = self._embed("text", tokens)
        return F.normalize(out, dim=-1) if normalize else out

    @property
    def logit_scale(self) -> Tensor:
        """The source's logit scale, a scalar log-temperature (CLIP's logits are
        exp(logit_scale) * cosine), as HookedCLIP's `logit_scale`."""
        self._px_live()
        return self._px_adapter.logit_scale(self._module).reshape(())

    @property
    def logit_bias(self) -> Tensor | None:
        """The bias the source adds to every logit (SigLIP), or None."""
        self._px_live()
        bias = self._px_adapter.logit_bias(self._module)
        return None if bias is None else bias.reshape(())

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Images [n, C, H, W] -> image embeddings [n, d_proj], traced (eval mode)."""
        if not isinstance(images, Tensor):
            raise InputError(f"encode_image: expected images [batch, channels, H, W], got {type(images).__name__}")
        out = self._embed("visual", images)
        return F.normalize(out, dim=-1) if normalize else out

    # ------------------------------------------------------------------ zero-shot head
    def zero_shot_classifier(self, class_names: Sequence[str] | None = None, templates: Sequence | None = None,
                             batch_size: int = 256) -> Tensor:
        """Class text embeddings [n_classes, d_proj] (`class_embeddings`; HookedCLIP's defaults)."""
        from ..hooked.clip import class_embeddings  # lazily: it imports TransformerLens

        with torch.no_grad():
            return class_embeddings(self.encode_text, class_names, templates, batch_size)

    def use_zero_shot_head(self, class_names: Sequence[str] | None = None,
                           templates: Sequence | None = None) -> Tensor:
        """Make the classes' text embeddings the head the analysis layer reads from the image
        embedding (`Backend.of(clip)` then outputs embed . text per class, as HookedCLIP's
        `visual` does after its `use_zero_shot_head`); returns them [n_classes, d_proj]. The
        source module is not changed: its own forward is as before."""
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES if class_names is None else class_names)
        embeds = self.zero_shot_classifier(names, templates)
        self.__dict__["_px_zero_shot"] = ZeroShotHead(embeds.detach(), names)
        return embeds

    @property
    def zero_shot_head(self) -> ZeroShotHead | None:
        """The head `use_zero_shot_head` installed (None: the analysis output is the embedding)."""
        return self.__dict__.get("_px_zero_shot")

    @property
    def class_names(self) -> list[str] | None:
        head = self.zero_shot_head
        return list(head.class_names) if head is not None else None
