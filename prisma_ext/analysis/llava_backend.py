"""The analysis methods' view of a traced LLaVA (`px.llava_backend(llava, prompt)`): its vision tower,
scored by the language model's next-token logits.

    be = px.llava_backend(llava, prompt_ids)            # the image token once in the prompt
    sweep = px.activation_patching(be, clean_images, corrupted_images, target=px.LogitDiff(yes, no),
                                   sites=("resid_post",), layers=[0, 1])

A run takes images [batch, C, H, W]; each is read with the same prompt (its image token expanded to
the image's tokens), through the whole model; the output is the next-token logits
[batch, vocab] at `position` (default: the prompt's last token), so a class is a vocabulary id
and `LogitDiff(a, b)` the logit difference of two answer tokens. Sites are the tower's, unprefixed
as a CLIP tower's are (`blocks.3.hook_resid_post` is `visual.blocks.3.hook_resid_post`), plus
`hook_image_features` / `hook_projected` and the language model's `lm.…` names; patching positions
are the tower's tokens (its class token and patch grid). Tower blocks after the one the projector
reads (`llava.projector_reads`) cannot change the logits: their patching effects are 0.

Refused by name: everything that reads the model's weights as a ViT readout (the logit lens,
direct logit attribution, attention readout weights, the CLIP decompositions). LLaVA's projector
is an MLP into the language model's input space, not an unembedding of the tower's residual
stream, and no tower token is read out alone; a lens through it would produce numbers with no
identity to check.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, PrismaError, UnsupportedModelError
from .backend import Backend, NNsightBackend

READOUT_REFUSAL = (
    "{what} reads the model as a ViT with a readout (its unembedding, W_U / W_O, the pooled token), which a "
    "LLaVA's vision tower does not have: its projector is an MLP into the language model's input space, not an "
    "unembedding, and the language model reads every image token. So the logit lens, direct logit attribution "
    "and the other readout methods are refused on a LLaVA; activation patching scored by next-token logits works: "
    "px.activation_patching(px.llava_backend(llava, prompt), clean, corrupted, target=px.LogitDiff(a, b))")


class LlavaReadout:
    """What `Backend.vit` is for a LLaVA: the tower's config with the vocabulary as its classes,
    and the language model's head (so class targets name token ids). Any weight-level readout
    (`readout`, `W_U`, `blocks`, ...) is refused by name."""

    def __init__(self, cfg: Any, head: torch.nn.Module):
        self.cfg, self.head, self.class_names = cfg, head, None

    @property
    def layout(self):
        return self.cfg.layout

    @property
    def readout(self):
        raise UnsupportedModelError(READOUT_REFUSAL.format(what="this method"))

    def to_single_token(self, name: str) -> int:
        raise InputError(f"{name!r}: a LLaVA's classes are vocabulary ids; tokenize the answer with the "
                         "checkpoint's tokenizer and pass its id")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise UnsupportedModelError(READOUT_REFUSAL.format(what=f"this method (it asks for {name!r})"))


class LlavaBackend(NNsightBackend):
    """A `TracedLlava` for one prompt (see the module docstring). `prompt`: token ids [seq] (or
    [1, seq]) with the image token once; `position`: the token whose next-token logits are the
    output (default -1, the last)."""

    kind = "nnsight"
    can_restart = False  # skipping tower blocks would skip transformers' capture of the projector's input

    def __init__(self, model: Any, prompt: Any, position: int = -1):
        module = model._module
        if model.__dict__.get("default_remote") or any(p.is_meta for p in module.parameters()):
            raise PrismaError("the analysis methods trace a LLaVA here and need its weights: load it with "
                              "backend='nnsight' and no remote=")
        ids = model.expand_prompt(prompt)
        if ids.shape[0] != 1:
            raise InputError(f"px.llava_backend(llava, prompt) takes one prompt (read with every image), "
                             f"got {ids.shape[0]}")
        if not -ids.shape[1] <= position < ids.shape[1]:
            raise InputError(f"position {position} is outside the prompt's {ids.shape[1]} tokens")
        vocab = module.config.text_config.vocab_size
        Backend.__init__(self, model, LlavaReadout(model.cfg.replace(n_classes=vocab), module.lm_head))
        self.prompt, self.position = ids, position

    @property
    def site_names(self) -> list[str]:
        names = self.model.site_names
        tower = [n[len("visual."):] for n in names if n.startswith("visual.")]
        return tower + [n for n in names if n.startswith("lm.")]

    def model_site(self, name: str) -> str:
        return name if name.startswith("lm.") else f"visual.{name}"

    def _open(self, images: Tensor):
        ids = self.prompt.to(images.device).expand(images.shape[0], -1)
        return self.model.trace(input_ids=ids, pixel_values=images, attention_mask=torch.ones_like(ids),
                                use_cache=False)

    def _output(self, tracer: Any, seen: dict[str, Tensor]) -> Tensor:
        return self.model.output.logits[:, self.position]


def llava_backend(model: Any, prompt: Any, position: int = -1) -> LlavaBackend:
    """The analysis methods' view of a `TracedLlava` for one prompt (token ids with the image token
    once): runs take images [batch, C, H, W], each with `prompt`; the output is the next-token
    logits [batch, vocab] at `position`; sites are the tower's, unprefixed."""
    return LlavaBackend(model, prompt, position)
