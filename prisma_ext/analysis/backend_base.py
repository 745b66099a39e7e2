"""The interface the analysis methods run a model through (`Backend`), what one run gives
(`Run`) and the helpers the implementations share; the implementations live in `backend_tl`
(TransformerLens) and `backend_nnsight` / `clip_backend` (nnsight), and `backend` registers them
with `Backend.of` (see its docstring for the whole interface)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._state import eval_mode, lock_of
from ..errors import InputError, PrismaError

if TYPE_CHECKING:  # pragma: no cover
    from .targets import Target

Edit = Callable[[Tensor], Tensor]
CLIP_OUTPUT = "hook_image_embed"  # a CLIP vision tower's output site, its image embedding
CLIP_RETURN_TYPES = ("logits", "embeds")  # what a CLIP vision tower's backend outputs


@dataclass
class Run:
    """What one forward pass gave: the output, the read sites and their gradients."""

    output: Tensor
    acts: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)


class Backend:
    """The interface; `of` picks the implementation for a model."""

    kind = "base"
    has_grid = True  # tokens sit on an image's patch grid (False: a text tower)
    can_restart = False  # `restart` reruns from a layer's residual stream

    def __init__(self, model, vit):
        self.model = model
        self.vit = vit

    @staticmethod
    def of(model) -> Backend:
        """The backend of a model returned by `px.load` (or a Backend, unchanged)."""
        if isinstance(model, Backend):
            return model
        for module_name, class_name, make in KINDS:
            module = sys.modules.get(module_name)  # not imported: the model cannot be one of its classes
            if module is not None and isinstance(model, getattr(module, class_name)):
                return make(model)
        raise PrismaError(f"expected a prisma-ext model (px.load(...) with backend 'tl' or 'nnsight'), "
                          f"got {type(model).__name__}")

    @property
    def cfg(self):
        return self.vit.cfg

    @property
    def layout(self):
        return self.vit.layout

    @property
    def readout(self):
        return self.vit.readout

    @property
    def class_names(self) -> list[str] | None:
        return self.vit.class_names

    @property
    def output_site(self) -> str | None:
        """The site the backend's output is, where it is one (a CLIP tower's image embedding)."""
        return None

    @property
    def site_names(self) -> list[str]:
        """The names `run` reads and edits (a CLIP's: its vision tower's, unprefixed)."""
        return list(self.vit.hook_dict)

    def run(self, images: Tensor, read: Sequence[str] = (), edit: Mapping[str, Edit] | None = None,
            grad_of: Callable[[Tensor], Tensor] | None = None) -> Run:
        raise NotImplementedError

    def output(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.run(images).output

    @property
    def root(self) -> torch.nn.Module:
        """The module whose mode and lock a run holds (the hooked model, or the traced source)."""
        return self.model

    def check_devices(self, images: Tensor) -> None:
        """Images on the device the model's weights are on (meta weights are none at all)."""
        param = next(self.root.parameters(), None)
        if param is None or not isinstance(images, Tensor):
            return
        if param.is_meta:
            raise InputError("the model's weights are on the meta device (none are loaded here): the analysis "
                             "methods need real weights")
        if images.device != param.device:
            raise InputError(f"images are on {images.device} and the model on {param.device}: move them, "
                             f"images.to({str(param.device)!r})")

    @contextlib.contextmanager
    def running(self, grad: bool = False) -> Iterator[None]:
        """One forward pass's hold on the model: its lock (several threads run one pass at a time,
        since hooks and traces are the model's shared state) and eval mode (dropout off; the
        model's own modes come back after, also on error)."""
        if grad and torch.is_inference_mode_enabled():
            raise InputError("a gradient method cannot run under torch.inference_mode(): call it outside that "
                             "block (torch.no_grad() is fine for the other methods)")
        with lock_of(self.root), eval_mode(self.root):
            yield

    def need_weights(self, pattern: str):
        """`vit`, with its TL parameters matching `pattern` (a regex) present (a remote model
        fetches them from the server; locally they all are)."""
        return self.vit

    def require_local(self, method: str, why: str) -> None:
        """PrismaError naming `method` and `why` where the model runs remotely (here: nothing)."""

    def restart(self, resid: Tensor, layer: int, edits: Mapping[str, Edit], rows: Tensor,
                images: Tensor | None = None) -> Tensor:
        """The output of the forward pass continued from `blocks.{layer}.hook_resid_pre` = resid
        [n, pos, d_model] with `edits` applied on the way; `rows` [n]: the input example of each
        row (a text tower pools each at its own position); `images` [n, ...]: those examples'
        inputs, for a backend that must open its forward pass at the input (nnsight)."""
        raise PrismaError(f"the {self.kind} backend cannot restart a forward pass mid-model")

    # ------------------------------------------------------------------ scoring targets
    def evaluate(self, images: Tensor, target: Target, read: Sequence[str] = (),
                 edit: Mapping[str, Edit] | None = None, grad: bool = False) -> tuple[Run, Tensor, Target]:
        """One forward pass: (run, scores [batch], the target bound to these images). With
        `grad`, `run.grads` holds the gradient of the summed scores at each read site."""
        stash: dict[str, Tensor] = {}
        found: dict[str, Any] = {}

        def metric(output: Tensor) -> Tensor:
            bound = target.bind(self, output, images.shape[0])
            found["target"], found["scores"] = bound, bound.score(output, stash)
            return found["scores"].sum()

        run = self.run(images, read=read, edit=_stash_edits(target, edit, stash),
                       grad_of=metric if grad else None)
        if not grad:
            metric(run.output)
        run.acts.update({k: v for k, v in stash.items() if k not in run.acts})
        return run, found["scores"], found["target"]

    def score_table(self, target: Target, edit: Mapping[str, Edit] | None = None) -> Callable[[Tensor], Tensor]:
        """images -> a bound target's table [n, K] (Captum's forward: pass `target=columns`)."""

        def forward(images: Tensor) -> Tensor:
            stash: dict[str, Tensor] = {}
            run = self.run(images, edit=_stash_edits(target, edit, stash))
            return target.table(run.output, stash)

        return forward


class Replace:
    """An edit that is data: value with the masked entries replaced by the source's,
    where(mask, source[rows], value) (mask broadcastable to value; `rows` [n] picks each row's
    source row, None: source is per row); a remote backend applies it inside its trace without
    calling prisma-ext code, and sends each source row once however many rows use it."""

    def __init__(self, mask: Tensor, source: Tensor, rows: Tensor | None = None):
        self.mask, self.source, self.rows = mask, source, rows

    def __call__(self, value: Tensor) -> Tensor:
        source = self.source if self.rows is None else self.source[self.rows.to(self.source.device)]
        return torch.where(self.mask.to(value.device), source.to(value), value)


class Keep:
    """The edit `_stash_edits` adds at a site a target reads: `inner` (or nothing), then the
    value kept in the stash (`store`)."""

    def __init__(self, site: str, inner: Edit | None, stash: dict[str, Tensor]):
        self.site, self.inner, self.stash = site, inner, stash

    def store(self, value: Tensor) -> None:
        self.stash[self.site] = value

    def __call__(self, value: Tensor) -> Tensor:
        value = self.inner(value) if self.inner is not None else value
        self.store(value)
        return value

    @property
    def changes_tokens(self) -> bool:
        return getattr(self.inner, "changes_tokens", False)


def _stash_edits(target: Target, edit: Mapping[str, Edit] | None, stash: dict[str, Tensor]) -> dict[str, Edit]:
    """`edit` plus, for each site the target reads, an edit that keeps its (edited) value."""
    edits = dict(edit or {})
    for site in target.sites:
        edits[site] = Keep(site, edits.get(site), stash)
    return edits


def _grad_leaf(images: Tensor, grad_of) -> Tensor:
    """With a gradient asked for: the images as a fresh leaf that requires grad, so every site
    downstream carries a gradient even when no parameter requires one (a model frozen with
    requires_grad_(False)); the caller's tensor is untouched."""
    if grad_of is None or not isinstance(images, Tensor) or not images.is_floating_point():
        return images
    return images.detach().requires_grad_(True)


def _grads(metric: Tensor, acts: dict[str, Tensor]) -> dict[str, Tensor]:
    names = [n for n, t in acts.items() if t.requires_grad]
    if metric.ndim != 0:
        raise PrismaError(f"grad_of must return a scalar, got shape {tuple(metric.shape)}")
    found = torch.autograd.grad(metric, [acts[n] for n in names], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(acts[n])) for n, g in zip(names, found)}



# (module, class, backend factory), tried in order; a module not yet imported is skipped.
# `backend` fills it when imported (every analysis module imports Backend from there).
KINDS: list[tuple[str, str, Callable[[Any], Backend]]] = []
