"""Splice an SAE into a traced model (the nnsight backend) at its site, for the length of a `with`.

    with splice(traced, sae, "blocks.2.hook_resid_post", use_error_term=True):
        with traced.trace(images):
            acts = traced.site("blocks.2.hook_resid_post.hook_sae_acts_post").save()  # [batch, pos, d_sae]
            traced.site("blocks.2.hook_resid_post.hook_sae_acts_post")[..., 7] = 0  # ablate latent 7
            logits = traced.output.save()

The mechanism: the SAE runs inside the forward of the module that produces the site, and hands
its intermediate values to the running trace as named values of that module (the way
`sitemaps.attention.serve` hands out values no module sees). For a site at a module's output
the module's nnsight body (the forward its controller runs) is wrapped so that its output goes
through the SAE before nnsight serves it; for a site at a module's input a torch forward
pre-hook puts the SAE's output in place of that input (copied into the live tensor for an
`in_place` site, so the skip connection sees it too). Forward hooks on the SAE's own hook
points serve `hook_sae_input`, `hook_sae_acts_pre`, `hook_sae_acts_post`, `hook_sae_recons`,
`hook_sae_error` and `hook_sae_output`, and the model's site map lists them under the site's
name, in forward order just before the site itself (which reads the spliced value, as on the TL
backend). Outside a trace the forward simply runs through the SAE. Leaving the `with`, even
after an error, undoes each step: the body, the hooks, the site names, the SAE's
`use_error_term`.

The SAE is prisma-ext code that must run inside the forward pass, so a spliced model cannot be
traced remotely (NDIF, `remote=`, also the simulated `remote="local"`): the server rebuilds the
model without the splice. `trace(..., remote=...)` is refused inside the `with`, before anything
is sent, and so is splicing a model whose traces default to remote.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from nnsight.intervention.source import STATE
from nnsight.intervention.util import first_input, replace_first_input
from torch import Tensor, nn

from ..errors import InputError, PrismaError, UnknownNameError, suggest
from ..sitemaps.attention import serve
from ..sitemaps.spec import Site
from .dictionary import SAE_HOOKS, SparseAutoencoder

_PLAIN_PORTS = ("input", "output")


def _current() -> Any:
    """The running greenlet: the model's forward, or a trace body's worker."""
    from greenlet import getcurrent

    return getcurrent()


class _Runner:
    """Runs the SAE on a site's value [..., d_in] -> [..., d_in], serving its hook points to the trace
    over `host` (the site's module) at `{host's path}.{key}` while the model's forward is the caller
    (an `sae(...)` a trace body calls on its own is left alone)."""

    def __init__(self, sae: SparseAutoencoder, host: nn.Module, keys: dict[str, str]):
        self.sae, self.host, self.keys = sae, host, keys
        self._callers: list[Any] = []

    def __call__(self, value: Tensor) -> Tensor:
        self._callers.append(_current())
        try:
            return self.sae(value).to(value.dtype)
        finally:
            self._callers.pop()

    def hook(self, hook_name: str) -> Callable[[nn.Module, Any, Tensor], Tensor | None]:
        key = self.keys[hook_name]

        def served(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
            if not self._callers or _current() is not self._callers[-1]:
                return None
            return serve(self.host, key, output)

        return served


class _SplicedBody:
    """A module's nnsight body whose output's site [TL layout] goes through the SAE (a site at the
    module's output); `inner` is the body it wraps."""

    def __init__(self, inner: Callable, site: Site, run: _Runner):
        self.inner, self.site, self.run = inner, site, run

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        raw = self.inner(module, *args, **kwargs)
        return self.site.view.write(self.run(self.site.view.read(raw)), raw)


def _spliced_input(site: Site, run: _Runner) -> Callable:
    """A forward pre-hook putting the SAE's output in place of the site at the module's first input."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        raw = first_input(args, kwargs)
        live = site.view.read(raw)
        if site.in_place:  # the forward reads this tensor elsewhere too (the skip connection)
            live.copy_(run(live.clone()))
            return None
        return replace_first_input(args, kwargs, site.view.write(run(live), raw))

    return pre_hook


def _install_body(state: Any, body: _SplicedBody) -> Callable[[], None]:
    """Wrap the controller's body for the `with`; the undo unlinks exactly this wrapper."""
    state.body = body

    def undo() -> None:
        if state.body is body:
            state.body = body.inner
            return
        outer = state.body  # another splice wrapped this one since: unlink it from the chain
        while isinstance(outer, _SplicedBody):
            if outer.inner is body:
                outer.inner = body.inner
                return
            outer = outer.inner

    return undo


def _check_site(model: Any, name: str) -> Site:
    """The site `name` can be spliced at, or a clear error."""
    sites = model.sites
    if not isinstance(name, str) or name not in sites:
        raise UnknownNameError(f"splice: {suggest(str(name), list(sites), 'site')}")
    if f"{name}.hook_sae_input" in sites:
        raise InputError(f"splice: {name} already has an SAE spliced in")
    site = sites[name]
    if site.port not in _PLAIN_PORTS:
        what = "an SAE's own site" if any(name.endswith(f".{h}") for h in SAE_HOOKS) else \
            f"a value that a swapped forward of {site.module or 'the model'} serves ({site.port!r})"
        raise InputError(f"splice: {name} is {what}; on the nnsight backend an SAE splices in at a site that is a "
                         "module's input or output (e.g. blocks.{i}.hook_resid_post)")
    if site.port == "output":
        swapped = [n for n, s in sites.items() if s.module == site.module and s.port not in _PLAIN_PORTS]
        if swapped:
            raise InputError(f"splice: the forward of {site.module} is swapped for a trace that reads {swapped[0]}, "
                             f"which would drop the SAE at {name}; splice at a neighbouring site")
    return site


def _check_width(model: Any, name: str, sae: SparseAutoencoder) -> None:
    width = int(model.site_shapes()[name][-1])
    if width != sae.d_in:
        raise InputError(f"splice: the SAE reads d_in={sae.d_in} but {name} is {width} wide")


def _add_sites(model: Any, name: str, keys: dict[str, str]) -> Callable[[], None]:
    """List the SAE's sites under `name`, just before it; the undo removes exactly these names."""
    site = model.sites[name]
    shapes = {"hook_sae_acts_pre": "[batch, pos, d_sae]", "hook_sae_acts_post": "[batch, pos, d_sae]"}
    added = {f"{name}.{h}": Site(site.module, keys[h], shape=shapes.get(h, site.shape)) for h in SAE_HOOKS}
    sites: dict[str, Site] = {}
    for other, where in model.sites.items():
        if other == name:
            sites.update(added)
        sites[other] = where
    _set_sites(model, sites)

    def undo() -> None:
        _set_sites(model, {n: s for n, s in model.sites.items() if n not in added})
        for n in added:
            model._px_props.pop(n, None)

    return undo


def _set_sites(model: Any, sites: dict[str, Site]) -> None:
    model._px_sites = sites
    model._px_order = {n: i for i, n in enumerate(sites)}


def _refuse_remote(model: Any) -> Callable[[], None]:
    """Shadow `model.trace` for the `with` with one that refuses `remote=` before anything is sent."""
    if getattr(model, "default_remote", False):
        raise InputError(f"splice: this {type(model).__name__} traces remotely by default "
                         f"(remote={model.default_remote!r}); a spliced SAE is prisma-ext code that runs inside the "
                         "forward pass, which a remote server does not have: set model.default_remote = False to "
                         "splice and trace locally")
    local_trace = model.trace

    def trace(*inputs: Any, **kwargs: Any) -> Any:
        if kwargs.get("remote"):
            raise InputError(f"a model with an SAE spliced in cannot trace remotely (remote={kwargs['remote']!r}): "
                             "the SAE is prisma-ext code that runs inside the forward pass, which the server "
                             "does not have; trace locally inside the splice, or remotely outside it")
        return local_trace(*inputs, **kwargs)

    trace.__doc__ = local_trace.__doc__
    model.__dict__["trace"] = trace
    return lambda: model.__dict__.pop("trace", None)


@contextmanager
def splice_traced(model: Any, sae: SparseAutoencoder, name: str, use_error_term: bool = False) -> Iterator[Any]:
    """Run the traced `model` (TracedViT, TracedCLIP) with `sae` at site `name` inside the `with`
    (module docstring). Refused: an unknown site, one that is not a module's input or output, an SAE
    whose d_in is not the site's width, a site already spliced, a model that traces remotely."""
    site = _check_site(model, name)
    module = model._module.get_submodule(site.module) if site.module else model._module
    state = module.__dict__.get(STATE)
    if state is None:
        raise PrismaError(f"splice: {site.module or 'the root module'} is not wrapped by nnsight (no controller)")
    _check_width(model, name, sae)
    keys = {h: f"sae[{name}].{h}" for h in SAE_HOOKS}
    run = _Runner(sae, module, keys)
    with ExitStack() as undo:
        undo.callback(_refuse_remote(model))
        saved = sae.use_error_term
        undo.callback(setattr, sae, "use_error_term", saved)
        sae.use_error_term = use_error_term
        for hook_name in SAE_HOOKS:
            undo.callback(getattr(sae, hook_name).register_forward_hook(run.hook(hook_name)).remove)
        if site.prepare is not None:  # e.g. timm's fused_attn off, so the site's module runs at all
            restore = site.prepare(model._module)
            if restore is not None:
                undo.callback(restore)
        if site.port == "output":
            undo.callback(_install_body(state, _SplicedBody(state.body, site, run)))
        else:
            undo.callback(module.register_forward_pre_hook(_spliced_input(site, run), with_kwargs=True).remove)
        undo.callback(_add_sites(model, name, keys))
        yield model
