"""The analysis backend of a remote model (`RemoteTracedViT`, `RemoteTracedCLIP`'s vision tower):
every forward pass is a trace sent to the server (NDIF, nnsight's `remote="local"`, or a trace
backend of the caller's own), whose body holds no prisma-ext code.

A server has torch, transformers and nnsight, not prisma-ext, so a trace body may only read and
set sites (the envoy's by-value site table), do torch ops and save. The body is `_remote_trace`:
it sets sites to data, reads sites and the output, and, for a gradient, runs nnsight's backward
inside the trace. What a method asks of `run` becomes data here:

- an edit that is data (`Replace`: patching's masked replacement; `Keep` without an inner edit:
  a target's read) travels as tensors and is applied in the body;
- any other edit (prisma-ext code: an ablation, an SAE splice) runs here: one trace reads the
  site's value, the edit runs locally, and the next trace sets the result (one more round trip
  per such site, in forward order);
- a gradient: one trace returns the output (and the sites a target reads), the metric and its
  gradient at those run here, and a second trace backpropagates that gradient through the model
  (nnsight's `with loss.backward()`) and returns it at the read sites: by the chain rule the
  same gradient a local run takes. A gradient through an edit that runs here is refused by name.

The weights a method reads come from the model itself (`remote_weights`: the readout and each
layer's W_O / b_O, saved from one trace); nothing else is downloaded.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, PrismaError
from .backend_base import CLIP_OUTPUT as OUTPUT
from .backend_base import CLIP_RETURN_TYPES as RETURN_TYPES
from .backend_base import Keep, Replace, Run, _grad_leaf
from .backend_nnsight import NNsightBackend
from .backend_tl import TextTower
from .clip_tower import EmbeddingOutput, TowerSites
from .remote_weights import FETCHED

REFUSED_EDIT = ("it changes the number of tokens (a test-time register): a remote site table sets a site to a value "
                "of the same shape only")


def _remote_trace(model: Any, args: tuple, kwargs: dict, order: list[str], sets: dict[str, tuple],
                  reads: list[str], output: str, backward: tuple | None) -> tuple[Tensor, dict, dict]:
    """One trace of `model` on its inputs `args` / `kwargs`, plain code only (it runs where the
    model is, without prisma-ext): visit `order` (site names, forward order), setting each site
    in `sets` to ("where", mask, source, rows): where(mask, source[rows] (rows None: source),
    value), or ("set", value), and keeping each in `reads`; the raw output is the site `output`
    where it is one of them, else that attribute of the model's output. `backward` (gradient of
    the raw output, {site: gradient}): backpropagate their dot product and return the gradient
    at each read site. -> (raw output, {site: value}, {site: gradient})."""
    from nnsight import save

    with model.trace(*args, **kwargs):
        acts = save({})
        grads = save({})
        seen = {}
        for name in order:
            value = model.site(name)
            change = sets.get(name)
            if change is not None:
                if change[0] == "where":
                    source = change[2] if change[3] is None else change[2][change[3]]
                    value = torch.where(change[1].to(value.device), source.to(value), value)
                else:
                    value = change[1].to(value)
                model.set_site(name, value)
            seen[name] = value
            if name in reads:
                acts[name] = value
        raw = seen[output] if output in seen else getattr(model.output, output)
        raw = save(raw)
        if backward is not None:
            loss = (raw * backward[0].to(raw)).sum()
            for name, grad in backward[1].items():
                loss = loss + (seen[name] * grad.to(seen[name])).sum()
            with loss.backward():
                for name in reversed(order):
                    if name in reads and seen[name].requires_grad:
                        grads[name] = seen[name].grad
    return raw, acts, grads


class RemoteBackend(NNsightBackend):
    """A `RemoteTracedViT`: see the module docstring. Its output is the model's logits."""

    kind = "remote"
    raw_output = "logits"  # the attribute of the model's output, or a site (a CLIP tower's embedding)

    def __init__(self, model: Any, vit: Any = None, raw_output: str | None = None):
        if raw_output is not None:
            self.raw_output = raw_output
        super().__init__(model, vit if vit is not None else remote_tower(model))

    @property
    def can_restart(self) -> bool:
        return False

    def with_head(self, vit: Any) -> Any:
        """What `vit` is for this backend, given the converted tower (a CLIP adds its head)."""
        return vit

    def need_weights(self, pattern: str) -> Any:
        """`vit`, with the TL parameters matching `pattern` (a regex) fetched from the model in one
        more trip where they are not yet."""
        self.vit = self.with_head(remote_tower(self.model, re.compile(pattern)))
        return self.vit

    def require_local(self, method: str, why: str) -> None:
        raise PrismaError(f"{method} cannot run on a remote model ({type(self.model).__name__}): {why}. Nothing was "
                          "sent. Run it on a local model (backend='nnsight' without remote=, or backend='tl')")

    def check_devices(self, images: Tensor) -> None:
        """Inputs travel with the request (the server moves them to its device): any device."""
        if not isinstance(images, Tensor):
            raise InputError(f"images must be a tensor, got {type(images).__name__}")

    def open_args(self, images: Tensor) -> tuple[tuple, dict]:
        """The trace's inputs for `images`, as plain values."""
        return (images,), {}

    def finish(self, raw: Tensor) -> Tensor:
        """The output the analysis reads, from the raw output the trace returns (local code)."""
        return raw

    def trip(self, images: Tensor, order: list[str], sets: dict, reads: list[str],
             backward: tuple | None = None) -> tuple[Tensor, dict, dict]:
        """One round trip (`_remote_trace`), in the model's own site names."""
        args, kwargs = self.open_args(images)
        with self.running(grad=backward is not None), torch.set_grad_enabled(backward is not None):
            return _remote_trace(self.model, args, kwargs, order, sets, reads, self.raw_output, backward)

    def run(self, images, read=(), edit=None, grad_of=None) -> Run:
        edit = dict(edit or {})
        names = self._mapped([*edit, *read])
        self.check_devices(images)
        full = {name: self.model_site(name) for name in names}
        order = [full[n] for n in names]
        sets, keeps, local = {}, {}, []
        for name in (n for n in names if n in edit):
            fn = edit[name]
            if getattr(fn, "changes_tokens", False):
                raise PrismaError(f"the edit of {name} cannot run on a remote model: {REFUSED_EDIT}")
            inner = fn.inner if isinstance(fn, Keep) else fn
            if isinstance(fn, Keep):
                keeps[name] = fn
            if isinstance(inner, Replace):
                sets[full[name]] = ("where", inner.mask, inner.source, inner.rows)
            elif inner is not None:
                local.append(name)
        if grad_of is not None and local:
            raise PrismaError(f"a gradient through the edit of {local[0]} cannot run on a remote model: the edit is "
                              "local code, applied between round trips, so no gradient flows through it")
        for name in local:  # each: read the value, edit it here, set the result in the next trips
            _, acts, _ = self.trip(images, order, sets, [full[name]])
            sets[full[name]] = ("set", edit[name](acts[full[name]]))
        wanted = [full[n] for n in dict.fromkeys([*read, *keeps])]
        raw, acts, _ = self.trip(images, order, sets, wanted)
        values = {n: acts[full[n]] for n in dict.fromkeys([*read, *keeps])}
        if grad_of is None:
            for name, keep in keeps.items():
                keep.store(values[name])
            return Run(self.finish(raw), {n: values[n] for n in read}, {})
        return self._gradient_run(images, order, sets, full, read, keeps, raw, values, grad_of)

    def _gradient_run(self, images, order, sets, full, read, keeps, raw, values, grad_of) -> Run:
        """The metric and its gradient at the raw output and the kept sites, here; then one more
        trip that backpropagates it and returns the gradient at each read site."""
        raw = raw.detach().requires_grad_(True)
        leaves = {n: values[n].detach().requires_grad_(True) for n in keeps}
        for name, keep in keeps.items():
            keep.store(leaves[name])
        output = self.finish(raw)
        metric = grad_of(output)
        if metric.ndim != 0:
            raise PrismaError(f"grad_of must return a scalar, got shape {tuple(metric.shape)}")
        found = torch.autograd.grad(metric, [raw, *leaves.values()], allow_unused=True)
        g_raw = found[0] if found[0] is not None else torch.zeros_like(raw)
        g_sites = {full[n]: g for n, g in zip(leaves, found[1:]) if g is not None}
        _, _, grads = self.trip(_grad_leaf(images, grad_of), order, sets, [full[n] for n in read],
                                backward=(g_raw.detach(), g_sites))
        got = {n: grads[full[n]] if full[n] in grads else torch.zeros_like(values[n]) for n in read}
        return Run(output.detach(), {n: values[n] for n in read}, got)


class RemoteCLIPBackend(EmbeddingOutput, TowerSites, RemoteBackend):
    """A `RemoteTracedCLIP`'s vision tower, as `TracedCLIPBackend` is a TracedCLIP's: each run is
    one trace of the source's image encoder; the output is the image embedding, or the zero-shot
    logits once `use_zero_shot_head` is set (computed here from the embedding the trace returns)."""

    raw_output = "visual." + OUTPUT

    def __init__(self, model: Any, return_type: str = "logits"):
        if return_type not in RETURN_TYPES:
            raise PrismaError(f"return_type must be one of {RETURN_TYPES} on a traced CLIP, got {return_type!r}")
        self.head, self.return_type = model.zero_shot_head, return_type
        super().__init__(model, self.with_head(remote_tower(model)))

    def with_head(self, vit: Any) -> Any:
        """`vit` with the zero-shot head as its unembedding, on a copy (the cached one keeps none)."""
        import copy

        if self.head is None:
            return vit
        vit = copy.deepcopy(vit)
        vit.set_unembed(self.head.weight.to(device=vit.cfg.device, dtype=vit.cfg.dtype), self.head.class_names)
        return vit

    def open_args(self, images: Tensor) -> tuple[tuple, dict]:
        model = self.model
        return (), {"fn": model.encoder("visual"), **model.tower_inputs("visual", images)}

    def finish(self, raw: Tensor) -> Tensor:
        return self.from_embedding(raw)


class RemoteTextBackend(TextTower, TowerSites, RemoteBackend):
    """A `RemoteTracedCLIP`'s text tower on token ids, as `TracedTextBackend` is a TracedCLIP's:
    each run one trace of the source's text encoder, the output the text embedding (its site,
    `hook_text_embed`). `vit` is the text tower's skeleton for its config and pooling rule: no
    weight of it is downloaded (each is `Unfetched`)."""

    tower = "text"
    raw_output = "text.hook_text_embed"

    def __init__(self, model: Any, tokens: Tensor):
        if model.text_cfg is None:
            raise InputError(f"{type(model._module).__name__} has no text tower")
        self.tokens = tokens
        super().__init__(model, text_skeleton(model))

    def _mapped(self, names: list[str]) -> list[str]:
        return super()._mapped([*names, "hook_text_embed"])  # the output is read at its site

    def open_args(self, tokens: Tensor) -> tuple[tuple, dict]:
        model = self.model
        return (), {"fn": model.encoder("text"), **model.tower_inputs("text", tokens)}


def text_skeleton(model: Any):
    """The text tower's HookedTextTransformer built on meta from its config, every parameter
    `Unfetched` (a remote text tower's backend reads only its config and pooling rule)."""
    from ..hooked.text import HookedTextTransformer
    from .remote_weights import settle

    with torch.device("meta"):
        skeleton = HookedTextTransformer(model.text_cfg).eval()  # cfg.device: "cpu" (see _RemoteClient)
    return settle(skeleton, {})


def remote_tower(model: Any, wanted: re.Pattern = FETCHED):
    """A HookedViT of the model's vision tower whose TL parameters matching `wanted` (and any
    other computed from the same sources) are the model's own, saved from the model in one
    trace (module `remote_weights`), the rest `Unfetched`. What was fetched is kept on the model,
    so a later call fetches only the sources it lacks (no trip when none)."""
    from ..hooked.vit import HookedViT
    from . import remote_weights as rw

    cfg, adapter, module = model.cfg, model.adapter, model._module  # cfg.device: "cpu" (see _RemoteClient)
    class_names = adapter.class_names(module)

    def convert(source: torch.nn.Module) -> HookedViT:
        return HookedViT.from_weights(cfg, adapter.weights(source), class_names, meta=True)

    state = model.__dict__.setdefault("_px_remote_weights", {"fetched": {}, "built": None})
    if "lineage" not in state:
        state["lineage"] = rw.lineage(convert, module)
    missing = [n for n in rw.needed_sources(state["lineage"], wanted) if n not in state["fetched"]]
    if missing:
        state["fetched"].update(model.fetch_parameters(missing))
        state["built"] = None
    if state["built"] is None:
        state["built"] = rw.partial_conversion(convert, module, state["fetched"], device=cfg.device)
    return state["built"]


def remote_clip_backend(model: Any) -> RemoteBackend:
    """`Backend.of(remote_clip)`: its vision tower (a CLIPVisionModel on its own: HookedViT's names)."""
    if model.towers == {"visual": ""}:
        return RemoteBackend(model, raw_output="pooler_output")
    return RemoteCLIPBackend(model)
