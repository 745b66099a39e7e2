"""The nnsight backend of a TracedViT: the original module, traced; weights from a cached
unprocessed conversion (`weights_copy`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import MissingSiteError, PrismaError
from .backend_base import Backend, Run, _grad_leaf, _grads


class NNsightBackend(Backend):
    """A TracedViT (or a CLIP vision tower traced on its own): the original module, traced by
    nnsight; `vit` (default: `weights_copy(model)`) holds its weights. Subclasses say how a trace
    opens (`_open`), what its output is (`_output`) and where a site name lives (`model_site`)."""

    kind = "nnsight"

    def __init__(self, model, vit=None):
        super().__init__(model, vit if vit is not None else weights_copy(model))

    @property
    def root(self) -> torch.nn.Module:
        return self.model._module

    @property
    def site_names(self) -> list[str]:
        return list(self.model.site_names)

    def model_site(self, name: str) -> str:
        """The traced model's own name for site `name` as `run` takes it (a traced CLIP's
        `blocks.3.hook_resid_post` is its `visual.blocks.3.hook_resid_post`)."""
        return name

    def _open(self, images: Tensor):
        """The trace of one forward pass on `images`."""
        return self.model.trace(images)

    def _output(self, tracer, seen: dict[str, Tensor]) -> Tensor:
        """Inside the trace, after the sites `seen` (name -> value, edited) were read: the output
        tensor the analysis reads."""
        return _tensor_output(self.model, self.model.output)

    @property
    def can_restart(self) -> bool:
        """Every block's output is its residual stream as is (`TracedModel.skips_as_output`), so a
        restart can skip the blocks before its layer (nnsight's `skip`)."""
        cached = self.__dict__.get("_px_can_restart")
        if cached is None:
            model = self.model
            cached = all(model.skips_as_output(self.model_site(f"blocks.{i}.hook_resid_post"))
                         and self.model_site(f"blocks.{i}.hook_resid_pre") in model.site_names
                         for i in range(self.cfg.n_layers))
            self.__dict__["_px_can_restart"] = cached
        return cached

    def restart(self, resid, layer, edits, rows, images=None) -> Tensor:
        """The forward pass on `images` with blocks 0..layer-1 skipped, the last of them giving
        `resid` as its output (and `blocks.{layer}.hook_resid_pre` set to it), then `edits`:
        the same output as the TL backend's restart, without computing the skipped blocks."""
        if not self.can_restart or images is None:
            return super().restart(resid, layer, edits, rows, images)

        def start(value: Tensor) -> Tensor:
            return resid
        edits = {f"blocks.{layer}.hook_resid_pre": start, **edits}
        skips = [self.model_site(f"blocks.{i}.hook_resid_post") for i in range(layer)]
        return self.run(images, edit=edits, skip=(skips, resid)).output

    def run(self, images, read=(), edit=None, grad_of=None, skip: tuple[list[str], Tensor] | None = None) -> Run:
        """As `Backend.run`; `skip` (names, value): inside the trace, first skip the modules whose
        outputs those sites are, each giving `value` (see `restart`)."""
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
                model.prepare([self.model_site(n) for n in names])
                for full in (skip[0] if skip is not None else ()):
                    model.skip_to(full, skip[1])
                for name in names:
                    value = model.site(self.model_site(name))
                    if name in edit:
                        value = edit[name](value)
                        model.set_site(self.model_site(name), value,
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
    adapter = model.adapter
    return cached_conversion(model, "_px_weights_copy", lambda: HookedViT.from_weights(
        model.cfg, adapter.weights(module), adapter.class_names(module)))


def cached_conversion(model, key: str, build):
    """`build()` (a conversion of the traced model's weights), kept in `model.__dict__[key]` while
    its parameters are unchanged (same tensors, same versions); building leaves the global RNG
    as it was."""
    stamp = tuple((p.data_ptr(), p._version) for p in model._module.parameters())
    cached = model.__dict__.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    with torch.random.fork_rng(devices=[]):
        built = build()
    model.__dict__[key] = (stamp, built)
    return built
