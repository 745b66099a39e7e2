"""HookedCLIP: both CLIP towers hooked, with text classes as the vision tower's unembedding."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError, PrismaError
from .root import CheckedHookedRoot
from .text import HookedTextTransformer
from .tokenize import PromptTokenizer
from .vit import HookedViT


class HookedCLIP(CheckedHookedRoot):
    """`visual` (a HookedViT ending in the image projection) and `text` (a HookedTextTransformer).

    Site names carry the tower: `visual.blocks.3.hook_resid_post`, `text.blocks.0.attn.hook_pattern`.
    `model(images, texts)` gives logits_per_image [n_images, n_texts] =
    exp(logit_scale) * cos(image, text) (+ logit_bias). For TransformerLens's cache methods (direct
    logit attribution, ...) run a tower on its own: `model.visual.run_with_cache(images)`.
    """

    def __init__(self, visual: HookedViT, text: HookedTextTransformer, logit_scale: Tensor,
                 logit_bias: Tensor | None = None,
                 tokenizer: PromptTokenizer | Callable[[], PromptTokenizer] | None = None,
                 source: str = ""):
        super().__init__()
        if visual.cfg.d_proj != text.cfg.d_proj:
            raise PrismaError(f"image ({visual.cfg.d_proj}) and text ({text.cfg.d_proj}) embeddings differ")
        self.visual, self.text = visual, text
        self.logit_scale = nn.Parameter(logit_scale.detach().clone().reshape(()))
        self.logit_bias = (nn.Parameter(logit_bias.detach().clone().reshape(()))
                           if logit_bias is not None else None)
        self.tokenizer = tokenizer
        self.source = source
        self.setup()

    # ------------------------------------------------------------------ presentation
    @property
    def layout(self):
        return self.visual.layout

    @property
    def class_names(self) -> list[str] | None:
        return self.visual.class_names

    def preprocess(self, image) -> Tensor:
        return self.visual.preprocess(image)

    def summary(self) -> str:
        scale = self.logit_scale.detach().exp().item()
        return "\n".join([f"HookedCLIP from {self.source or 'weights'}: logit scale {scale:.2f}",
                          "vision tower: " + self.visual.summary(), self.text.summary()])

    def site_shapes(self, batch_size: int = 1) -> dict[str, tuple[int, ...]]:
        shapes = {f"visual.{k}": v for k, v in self.visual.site_shapes(batch_size).items()}
        shapes.update({f"text.{k}": v for k, v in self.text.site_shapes(batch_size).items()})
        return shapes

    # ------------------------------------------------------------------ encoders
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Prompts -> token ids [n, context_length] (long prompts truncated with a warning)."""
        if self.tokenizer is None:
            raise PrismaError(f"no tokenizer is available for {self.source or 'this model'}; pass token ids")
        if not isinstance(self.tokenizer, PromptTokenizer):  # a factory: build it on first use
            self.tokenizer = self.tokenizer()
        return self.tokenizer(texts).to(self.text.pos_embed.device)

    def _tokens(self, texts) -> Tensor:
        return texts if isinstance(texts, Tensor) else self.tokenize(texts)

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """images -> image embeddings [n_images, d_proj]."""
        out = self.visual(images, return_type="embeds")
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, texts: Sequence[str] | Tensor, normalize: bool = False) -> Tensor:
        """prompts (or token ids [n, pos]) -> text embeddings [n_texts, d_proj]."""
        out = self.text(self._tokens(texts))
        return F.normalize(out, dim=-1) if normalize else out

    def forward(self, images: Tensor, texts: Sequence[str] | Tensor) -> Tensor:
        """logits_per_image [n_images, n_texts]."""
        image = self.encode_image(images, normalize=True)
        text = self.encode_text(texts, normalize=True)
        logits = self.logit_scale.exp() * image @ text.T
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def image_text_score(self, images: Tensor, texts: Sequence[str] | Tensor) -> Tensor:
        """The logit of each image with its own prompt [batch]: images[i] with texts[i]."""
        tokens = self._tokens(texts)
        if images.shape[0] != tokens.shape[0]:
            raise InputError(f"image/text batch mismatch: {images.shape[0]} images, {tokens.shape[0]} prompts")
        image = self.encode_image(images, normalize=True)
        text = self.encode_text(tokens, normalize=True)
        score = self.logit_scale.exp() * (image * text).sum(-1)
        return score + self.logit_bias if self.logit_bias is not None else score

    # ------------------------------------------------------------------ zero-shot head
    def zero_shot_classifier(self, class_names: Sequence[str] | None = None,
                             templates: Sequence | None = None, batch_size: int = 256) -> Tensor:
        """Text embeddings of the classes [n_classes, d_proj], each the normalised mean of the
        normalised embeddings of its prompts. Defaults: open_clip's ImageNet class names and the
        OpenAI ImageNet prompt templates (both ship with open_clip)."""
        with torch.no_grad():
            return class_embeddings(self.encode_text, class_names, templates, batch_size)

    def use_zero_shot_head(self, class_names: Sequence[str] | None = None,
                           templates: Sequence | None = None) -> Tensor:
        """Make the classes' text embeddings the vision tower's unembedding; returns them.

        Afterwards `model.visual(images)` gives, per class, image_embedding . text_embedding: the
        zero-shot logit before CLIP divides by the image embedding's norm and multiplies by
        exp(logit_scale) (a positive factor per image, so rankings are unchanged), and
        `visual.W_U` [d_model, n_classes] reads it from the final norm's output.
        """
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES if class_names is None else class_names)
        embeds = self.zero_shot_classifier(names, templates)
        self.visual.set_unembed(embeds, names)
        return embeds


def class_embeddings(encode: Callable[[list[str]], Tensor], class_names: Sequence[str] | None,
                     templates: Sequence | None, batch_size: int = 256) -> Tensor:
    """[n_classes, d_proj]: per class the normalised mean of its prompts' normalised embeddings
    (`encode(prompts) -> [n, d_proj]`, prompts in batches of `batch_size`). Defaults: open_clip's
    ImageNet class names and OpenAI's ImageNet prompt templates (both ship with open_clip)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    class_names = list(IMAGENET_CLASSNAMES if class_names is None else class_names)
    templates = list(OPENAI_IMAGENET_TEMPLATES if templates is None else templates)
    if not class_names:
        raise InputError("no class names given")
    if not templates:
        raise InputError("no prompt templates given")
    prompts = [t(c) if callable(t) else t.format(c) for c in class_names for t in templates]
    embeds = torch.cat([F.normalize(encode(prompts[i:i + batch_size]), dim=-1)
                        for i in range(0, len(prompts), batch_size)])
    return F.normalize(embeds.view(len(class_names), len(templates), -1).mean(dim=1), dim=-1)
