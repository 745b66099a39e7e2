"""One interface to a model on either backend, for the analysis methods.

`Backend.of(model)` accepts a HookedViT or HookedCLIP (TransformerLens backend) or a TracedViT
(nnsight backend) and offers:
- `run(images, read=..., edit=..., grad_of=...)`: one forward pass that reads sites (TL names,
  TL layouts), replaces some (`edit[name](value) -> new value`) and, given a scalar function of
  the output, the gradient of that scalar at each read site;
- `vit`: a HookedViT with the model's weights, for weight-level quantities (`W_O`, `W_U`, the
  final norm) and for restarting the forward pass from a layer (`run_from`);
- the token layout, config and class names.
On the nnsight backend activations come from the original module, traced; `vit` is an
unprocessed conversion of it used only for weights, so both backends give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import PrismaError

Edit = Callable[[Tensor], Tensor]


@dataclass
class Run:
    """What one forward pass gave: the output, the read sites and their gradients."""

    output: Tensor
    acts: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)


class Backend:
    kind = "base"
    has_grid = True  # tokens sit on an image's patch grid (False: a text tower)

    def __init__(self, model, vit):
        self.model = model
        self.vit = vit

    @staticmethod
    def of(model) -> Backend:
        if isinstance(model, Backend):
            return model
        from ..hooked.clip import HookedCLIP
        from ..hooked.vit import HookedViT

        if isinstance(model, HookedViT):
            return TLBackend(model, model)
        if isinstance(model, HookedCLIP):
            return TLBackend(model, model.visual)
        if type(model).__module__.startswith("prisma_ext.traced"):
            if type(model).__name__ != "TracedViT":
                raise PrismaError(
                    f"the analysis methods take a traced ViT on the nnsight backend; for a CLIP model "
                    f"({type(model).__name__}) load it with backend='tl', or trace its sites yourself with "
                    "model.site('visual.blocks.0.hook_resid_post') inside model.trace(...)")
            return NNsightBackend(model)
        raise PrismaError(f"expected a prisma-ext model (px.load(...) with backend 'tl' or 'nnsight'), "
                          f"got {type(model).__name__}")

    @property
    def cfg(self):
        return self.vit.cfg

    @property
    def layout(self):
        return self.vit.layout

    @property
    def class_names(self) -> list[str] | None:
        return self.vit.class_names

    def run(self, images: Tensor, read: Sequence[str] = (), edit: Mapping[str, Edit] | None = None,
            grad_of: Callable[[Tensor], Tensor] | None = None) -> Run:
        raise NotImplementedError

    def output(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.run(images).output


def _grads(metric: Tensor, acts: dict[str, Tensor]) -> dict[str, Tensor]:
    names = [n for n, t in acts.items() if t.requires_grad]
    if metric.ndim != 0:
        raise PrismaError(f"grad_of must return a scalar, got shape {tuple(metric.shape)}")
    found = torch.autograd.grad(metric, [acts[n] for n in names], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(acts[n])) for n, g in zip(names, found)}


class TLBackend(Backend):
    """A HookedViT, or a HookedCLIP's vision tower (its output: the image embedding, or the
    zero-shot logits once `use_zero_shot_head` set a head; `return_type` picks another output)."""

    kind = "tl"

    def __init__(self, model, vit, return_type: str = "logits"):
        super().__init__(model, vit)
        self.return_type = return_type

    def continue_from(self, resid: Tensor, layer: int, examples: Tensor, readout_only: bool = False) -> Tensor:
        """The output of the rest of the forward pass from `blocks.{layer}.hook_resid_pre`
        (`readout_only`: see HookedViT.run_from)."""
        return self.vit.run_from(resid, layer, self.return_type, readout_only)

    def run(self, images, read=(), edit=None, grad_of=None) -> Run:
        edit = dict(edit or {})
        read = list(read)
        acts: dict[str, Tensor] = {}

        def make_hook(name: str):
            def hook(value: Tensor, hook) -> Tensor:
                if name in edit:
                    value = edit[name](value)
                if name in read:
                    acts[name] = value
                return value
            return hook

        hooks = [(name, make_hook(name)) for name in dict.fromkeys([*edit, *read])]
        with torch.set_grad_enabled(grad_of is not None or torch.is_grad_enabled()):
            output = self.vit.run_with_hooks(images, return_type=self.return_type, fwd_hooks=hooks)
            grads = _grads(grad_of(output), acts) if grad_of is not None else {}
        return Run(output, acts, grads)


class NNsightBackend(Backend):
    """A TracedViT: the original module, traced by nnsight."""

    kind = "nnsight"

    def __init__(self, model):
        from ..hooked.vit import HookedViT

        adapter = model.adapter
        vit = HookedViT.from_weights(model.cfg, adapter.weights(model._module), adapter.class_names(model._module))
        super().__init__(model, vit)

    def run(self, images, read=(), edit=None, grad_of=None) -> Run:
        from nnsight import save

        edit = dict(edit or {})
        model = self.model
        names = model.select_sites([*edit, *read])
        with torch.set_grad_enabled(grad_of is not None or torch.is_grad_enabled()):
            with model.trace(images):
                acts = save({})
                for name in names:
                    value = model.site(name)
                    if name in edit:
                        value = edit[name](value)
                        model.set_site(name, value)
                    if name in read:
                        acts[name] = value
                output = save(model.output)
            grads = _grads(grad_of(output), acts) if grad_of is not None else {}
        return Run(output, dict(acts), grads)


class TextBackend(TLBackend):
    """A HookedCLIP's text tower on token ids (the TL backend); output: text embeddings."""

    has_grid = False

    def __init__(self, clip, tokens: Tensor):
        super().__init__(clip, clip.text, return_type="embeds")
        self.tokens = tokens

    @property
    def layout(self):
        from ..layout import TokenLayout

        n = self.tokens.shape[1]
        return TokenLayout(0, 0, 0, (1, n), (1, 1), (1, n))

    @property
    def class_names(self):
        return None

    def continue_from(self, resid: Tensor, layer: int, examples: Tensor, readout_only: bool = False) -> Tensor:
        return self.vit.run_from(resid, layer, self.tokens[examples], "embeds")
