"""One interface to a model on either backend, for the analysis methods.

`Backend.of(model)` takes a HookedViT or HookedCLIP (TransformerLens backend) or a TracedViT or
TracedCLIP (nnsight backend; a CLIP's vision tower, `clip_backend`), dispatching on the model's
type, and offers:
- `run(images, read=..., edit=..., grad_of=...)`: one forward pass that reads sites (TL names,
  TL layouts), replaces some (`edit[name](value) -> new value`) and, given a scalar function of
  the output, the gradient of that scalar at each read site (an edit function with the
  attribute `changes_tokens = True` may return another number of tokens: an appended register);
- `evaluate(images, target, ...)`: a run that also scores a target (`targets.Target`);
- `restart(resid, layer, edits, rows)`: the rest of a forward pass from a layer's residual stream
  (what patching reruns after a patch), on the backends that can (`can_restart`);
- `vit`: a HookedViT with the model's weights, for weight-level quantities (`W_O`, the readout)
  and `readout` (`prisma_ext.hooked.readout.Readout`);
- the token layout, config and class names.
On the nnsight backend activations come from the original module, traced; `vit` is an
unprocessed conversion of it used only for weights (built once per model and weights), so both
backends give the same numbers.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._state import eval_mode, lock_of
from ..errors import InputError, MissingSiteError, PrismaError

if TYPE_CHECKING:  # pragma: no cover
    from .targets import Target

Edit = Callable[[Tensor], Tensor]


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
        for module_name, class_name, make in _KINDS:
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

    def restart(self, resid: Tensor, layer: int, edits: Mapping[str, Edit], rows: Tensor) -> Tensor:
        """The output of the forward pass continued from `blocks.{layer}.hook_resid_pre` = resid
        [n, pos, d_model] with `edits` applied on the way; `rows` [n]: the input example of each
        row (a text tower pools each at its own position)."""
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


def _stash_edits(target: Target, edit: Mapping[str, Edit] | None, stash: dict[str, Tensor]) -> dict[str, Edit]:
    """`edit` plus, for each site the target reads, an edit that keeps its (edited) value."""
    edits = dict(edit or {})
    for site in target.sites:
        inner = edits.get(site)

        def keep(value: Tensor, site: str = site, inner: Edit | None = inner) -> Tensor:
            value = inner(value) if inner is not None else value
            stash[site] = value
            return value

        edits[site] = keep
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

    def restart(self, resid, layer, edits, rows) -> Tensor:
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


class TextBackend(TLBackend):
    """A HookedCLIP's text tower on token ids (the TL backend); output: text embeddings."""

    has_grid = False

    def __init__(self, clip, tokens: Tensor):
        super().__init__(clip, clip.text, return_type="embeds")
        self.tokens = tokens

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

    def _continue(self, resid, layer, rows, readout_only) -> Tensor:
        return self.vit.run_from(resid, layer, self.tokens[rows], "embeds")


class NNsightBackend(Backend):
    """A TracedViT (or a CLIP vision tower traced on its own): the original module, traced by
    nnsight; `vit` (default: `weights_copy(model)`) holds its weights. Subclasses say how a trace
    opens (`_open`), what its output is (`_output`) and where a site name lives (`_full`)."""

    kind = "nnsight"

    def __init__(self, model, vit=None):
        super().__init__(model, vit if vit is not None else weights_copy(model))

    @property
    def root(self) -> torch.nn.Module:
        return self.model._module

    @property
    def site_names(self) -> list[str]:
        return list(self.model.site_names)

    def _full(self, name: str) -> str:
        """The model's site name for a name `run` takes."""
        return name

    def _open(self, images: Tensor):
        """The trace of one forward pass on `images`."""
        return self.model.trace(images)

    def _output(self, tracer, seen: dict[str, Tensor]) -> Tensor:
        """Inside the trace, after the sites `seen` (name -> value, edited) were read: the output
        tensor the analysis reads."""
        return _tensor_output(self.model, self.model.output)

    def run(self, images, read=(), edit=None, grad_of=None) -> Run:
        from nnsight import save

        edit = dict(edit or {})
        model = self.model
        names = self._mapped([*edit, *read])
        self.check_devices(images)
        images = _grad_leaf(images, grad_of)
        with self.running(grad=grad_of is not None), \
                torch.set_grad_enabled(grad_of is not None or torch.is_grad_enabled()):
            with self._open(images) as tracer:
                acts, seen = save({}), {}
                model.prepare([self._full(n) for n in names])
                for name in names:
                    value = model.site(self._full(name))
                    if name in edit:
                        value = edit[name](value)
                        model.set_site(self._full(name), value,
                                       tokens_change=getattr(edit[name], "changes_tokens", False))
                    seen[name] = value
                    if name in read:
                        acts[name] = value
                output = save(self._output(tracer, seen))
            grads = _grads(grad_of(output), acts) if grad_of is not None else {}
        return Run(output, dict(acts), grads)

    def _mapped(self, names: list[str]) -> list[str]:
        """The sites in forward order; MissingSiteError naming those the site map leaves out."""
        mapped = self.site_names
        known = set(mapped)
        missing = [n for n in dict.fromkeys(names) if n not in known]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            adapter = getattr(self.model.adapter, "name", type(self.model.adapter).__name__)
            raise MissingSiteError(
                f"it reads {shown}, which the site map of {type(self.model._module).__name__} (adapter {adapter!r}) "
                "does not map on the nnsight backend; the adapter can map them in its site_map "
                "(docs/adapters.md), or load the model with backend='tl'", missing)
        order = {n: i for i, n in enumerate(mapped)}
        return sorted(dict.fromkeys(names), key=order.__getitem__)


def _tensor_output(model, output):
    """The model's output as the tensor the analysis reads (its adapter's `output_tensor`: a
    Hugging Face classifier's `logits`, a model without a head its pooled output, ...)."""
    model._px_live()  # the adapter, rebuilt where an unpickled model lost it
    return model._px_adapter.output_tensor(output)


def weights_copy(model):
    """A HookedViT with a traced model's weights (unprocessed), built once per model and kept while
    its parameters are unchanged (same tensors, same versions); building it leaves the global RNG
    as it was."""
    from ..hooked.vit import HookedViT

    module = model._module
    if any(p.is_meta for p in module.parameters()):
        raise PrismaError(
            f"{type(model).__name__} holds no weights here (it was built on the meta device for remote "
            "tracing), and the analysis methods read weights (the unembedding, W_O) locally: load the "
            "model with backend='nnsight' and no remote= for them")
    stamp = tuple((p.data_ptr(), p._version) for p in module.parameters())
    cached = model.__dict__.get("_px_weights_copy")
    if cached is not None and cached[0] == stamp:
        return cached[1]
    adapter = model.adapter
    with torch.random.fork_rng(devices=[]):
        vit = HookedViT.from_weights(model.cfg, adapter.weights(module), adapter.class_names(module))
    model.__dict__["_px_weights_copy"] = (stamp, vit)
    return vit


def _traced_clip(model) -> Backend:
    from .clip_backend import traced_clip_backend

    return traced_clip_backend(model)


# (module, class, backend factory), tried in order; a module not yet imported is skipped
_KINDS: list[tuple[str, str, Callable[[Any], Backend]]] = [
    ("prisma_ext.hooked.vit", "HookedViT", lambda m: TLBackend(m, m)),
    ("prisma_ext.hooked.clip", "HookedCLIP", lambda m: TLBackend(m, m.visual)),
    ("prisma_ext.traced.clip", "TracedCLIP", _traced_clip),
    ("prisma_ext.traced.model", "TracedViT", NNsightBackend),
]
