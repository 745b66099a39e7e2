"""The TransformerLens backend: a HookedViT, a HookedCLIP's vision tower, or its text tower."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .backend_base import Backend, Edit, Run, _grad_leaf, _grads


class TLBackend(Backend):
    """A HookedViT, or a HookedCLIP's vision tower (its output: the image embedding, or the
    zero-shot logits once `use_zero_shot_head` set a head; `return_type` picks another output)."""

    kind = "tl"
    can_restart = True

    def __init__(self, model, vit, return_type: str = "logits"):
        super().__init__(model, vit)
        self.return_type = return_type

    @property
    def output_site(self) -> str | None:
        tower = self.vit
        embeds = tower.cfg.d_proj and (self.return_type == "embeds" or (self.return_type == "logits"
                                                                         and tower.head is None))
        return "hook_image_embed" if embeds and tower is getattr(self.model, "visual", None) else None

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
        self.check_devices(images)
        with self.running(grad=grad_of is not None), \
                torch.set_grad_enabled(grad_of is not None or torch.is_grad_enabled()):
            output = self.vit.run_with_hooks(_grad_leaf(images, grad_of), return_type=self.return_type,
                                             fwd_hooks=hooks)
            grads = _grads(grad_of(output), acts) if grad_of is not None else {}
        return Run(output, acts, grads)

    def restart(self, resid, layer, edits, rows, images=None) -> Tensor:
        """Rerun the tower from `layer` with `edits` as hooks. The last block carries only the
        readout's tokens (`HookedViT.run_from(readout_only=True)`) unless an edit, or a hook a user
        left there, needs every token in it."""
        tower = self.vit
        last_block = f"blocks.{len(tower.blocks) - 1}."
        user_hooks = any(m._forward_hooks or m._forward_pre_hooks for m in tower.blocks[-1].modules())
        readout_only = not user_hooks and not any(name.startswith(last_block) for name in edits)
        hooks = [(name, _as_hook(fn)) for name, fn in edits.items()]
        with self.running(), tower.hooks(fwd_hooks=hooks):
            return self._continue(resid, layer, rows, readout_only)

    def _continue(self, resid: Tensor, layer: int, rows: Tensor, readout_only: bool) -> Tensor:
        return self.vit.run_from(resid, layer, self.return_type, readout_only)


def _as_hook(fn: Edit) -> Callable:
    return lambda value, hook: fn(value)


class TextTower:
    """What a CLIP text tower's backend (either backend) says about its tokens: `tokens`
    [batch, pos] (the base run's, where the tower pools) on one row, no patch grid, no classes,
    and no output site."""

    has_grid = False
    tokens: Tensor

    @property
    def output_site(self) -> str | None:
        return None

    @property
    def layout(self):
        from ..layout import TokenLayout

        n = self.tokens.shape[1]
        return TokenLayout(0, 0, 0, (1, n), (1, 1), (1, n))

    @property
    def class_names(self):
        return None


class TextBackend(TextTower, TLBackend):
    """A HookedCLIP's text tower on token ids (the TL backend); output: text embeddings."""

    def __init__(self, clip, tokens: Tensor):
        super().__init__(clip, clip.text, return_type="embeds")
        self.tokens = tokens

    def _continue(self, resid, layer, rows, readout_only) -> Tensor:
        return self.vit.run_from(resid, layer, self.tokens[rows], "embeds")
