"""The nnsight backend: the original source module wrapped by nnsight, read by TL site names.

    model = px.load("timm:vit_small_patch16_224", pretrained=False, backend="nnsight")
    with model.trace(images):
        resid = model.site("blocks.3.hook_resid_post").save()     # [batch, pos, d_model]
        model.set_site("blocks.5.attn.hook_pattern", uniform)      # a real edit
        logits = model.output.save()

The module is not converted: nnsight mirrors its tree (`model.blocks[3].attn.qkv.output` works
too) and the adapter's site map says where each TL site lives in it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from nnsight import NNsight, save
from nnsight.intervention.eproperty import eproperty
from nnsight.intervention.interleaver import Mediator
from nnsight.intervention.util import first_input, replace_first_input
from torch import Tensor, nn

from ..errors import InputError, PrismaError, UnknownNameError, suggest
from ..layout import TokenLayout
from ..sitemaps.spec import NOT_MAPPED, Site, Undo
from .batching import concat_invokes, image_rows

NameFilter = str | Iterable[str] | Callable[[str], bool] | None


class _Port:
    """What an eproperty needs to name a location: the envoy's path and interleaver."""

    def __init__(self, envoy: Any):
        self.path = envoy.path
        self.interleaver = envoy.interleaver


Watch = Callable[[str, Tensor], None]


def _site_property(name: str, site: Site, watch: Watch) -> eproperty:
    """An eproperty serving `site` in TL layout. Its transform hands the (possibly edited) TL
    tensor back to the model when the trace body next asks for anything, so that tensor is what
    flows on: in-place edits reach the output and `.grad` on it is the real gradient. At that hand
    back `watch(name, value)` records the tensor, so a forward that later changes it in place is
    caught; with `site.copy` the body holds a copy and the model a copy of what the body left."""
    view = site.view
    prop = eproperty(key=site.port)

    def handed_back(value: Tensor) -> Tensor:
        watch(name, value)
        return value.clone() if site.copy else value

    if site.port != "input":  # a module's output, or a value a swapped forward serves
        def served(host: _Port, raw: Any) -> Tensor:
            value = view.read(raw)
            return value.clone() if site.copy else value

        def written(host: _Port, value: Tensor, raw: Any) -> Any:
            return view.write(handed_back(value), raw)
    else:
        def served(host: _Port, raw: Any) -> Tensor:
            value = view.read(first_input(*raw))
            return value.clone() if site.copy else value

        def written(host: _Port, value: Tensor, raw: Any) -> Any:
            args, kwargs = raw
            return replace_first_input(args, kwargs, view.write(handed_back(value), first_input(args, kwargs)))
    prop(served)
    prop.transform(written)
    return prop


class TracedModel(NNsight):
    """An nnsight model over an original source module, with TL site names.

    `site(name)` (inside a trace) returns a site's live value in TL layout, to `.save()`, edit in
    place or take `.grad` of; `set_site(name, value)` replaces it. `site_names` lists the mapped
    sites in forward order, `layout` is the token layout, `cfg` the adapter's config. Settings a
    site needs for one trace (timm's `fused_attn`) are restored when the trace ends, also when
    its body raises. Subclasses say how invokes batch (`_batch_size`, `_batch`).
    """

    def __init__(self, module: nn.Module, adapter: Any = None, device: Any = None,
                 dtype: Any = None, **options: Any):
        if options:
            raise PrismaError(
                f"options {sorted(options)} are weight processing of the TL backend; the nnsight "
                "backend runs the original module unchanged (it takes only device and dtype)")
        if adapter is None:
            from ..adapters import adapter_for

            adapter = adapter_for(module)
        adapter.check_traced(module)
        if device is not None or dtype is not None:
            module.to(device=device, dtype=dtype)
        with warnings.catch_warnings():  # site maps spell such submodules as nnsight does (`envoy_path`)
            warnings.filterwarnings("ignore", message=".*has a submodule named", category=UserWarning)
            super().__init__(module)
        self._px_bind(module, adapter)

    def _px_bind(self, module: nn.Module, adapter: Any) -> None:
        """Read the adapter's site map and config of `module` (after nnsight wrapped it; a
        subclass that builds its module some other way, e.g. from a repo id, calls this)."""
        self._px_adapter = adapter
        self._px_sites: dict[str, Site] = dict(adapter.site_map(module))
        self._px_order = {name: i for i, name in enumerate(self._px_sites)}
        self._px_config = adapter.config(module)
        self._px_props: dict[str, eproperty] = {}
        self._px_undo: list[Undo] = []

    # Rebuilt from the module where a pickled model lands (`_px_live`), not pickled. A remote (or
    # simulated) request pickles this envoy with the trace body that refers to it (nnsight sends
    # the module itself only as a reference, `Module:<path>`, resolved on the server's copy);
    # unpickling the adapter and configs there would import prisma-ext's adapters.
    _PX_DERIVED = ("_px_adapter", "_px_config")

    def __getstate__(self) -> dict:
        """The envoy state nnsight pickles into a request, without what is rebuilt on arrival
        (adapter, configs, per-trace caches, the analysis layer's copy of the weights)."""
        state = super().__getstate__()
        state["_px_props"], state["_px_undo"], state["_px_watched"] = {}, [], []  # per-process, per-trace
        state.update(dict.fromkeys(self._PX_DERIVED))
        state.pop("_px_weights_copy", None)  # the analysis layer's local copy of the weights
        return state

    def _px_live(self) -> None:
        """Rebuild the adapter and configs from the module after unpickling (once)."""
        if self.__dict__.get("_px_adapter") is None:
            from ..adapters import adapter_for

            self._px_bind(self._module, adapter_for(self._module))

    # ------------------------------------------------------------------ what is here
    @property
    def adapter(self) -> Any:
        self._px_live()
        return self._px_adapter

    @property
    def cfg(self) -> Any:
        """The adapter's config of the source (a `ViTConfig` for a ViT)."""
        self._px_live()
        return self._px_config

    @property
    def layout(self) -> TokenLayout:
        return self.cfg.layout

    @property
    def site_names(self) -> list[str]:
        """The mapped TL site names, in forward order."""
        return list(self._px_sites)

    @property
    def sites(self) -> dict[str, Site]:
        """Site name -> `Site` (submodule path, port, view, TL shape)."""
        return dict(self._px_sites)

    # ------------------------------------------------------------------ sites
    def site(self, name: str) -> Tensor:
        """The live value of site `name` in TL layout (inside a trace).

        Edit it in place before the trace body reads a later site, or `.save()` it; inside
        `with loss.backward():` its `.grad` is the gradient there. Read sites in forward order.
        """
        site = self._lookup(name)
        envoy = self._enter(name, site)
        prop = self._px_props.get(name)
        if prop is None:
            prop = self._px_props[name] = _site_property(name, site, self._px_watch_read)
        return prop.__get__(_Port(envoy))

    def _px_watch_read(self, name: str, value: Tensor) -> None:
        """Remember a site's tensor and its version when it goes back to the model (see `interleave`)."""
        self.__dict__.setdefault("_px_watched", []).append((name, value, value._version))

    def _px_note_own_write(self, tensor: Tensor) -> None:
        """set_site's own in-place write is not the module's: the watched versions of that storage move on."""
        storage = tensor.untyped_storage().data_ptr()
        watched = self.__dict__.get("_px_watched", [])
        for i, (name, value, _) in enumerate(watched):
            if value.untyped_storage().data_ptr() == storage:
                watched[i] = (name, value, value._version)

    def _px_check_watched(self) -> None:
        """A site tensor changed in place after the model took it back: the value read is not what
        the site computed (a forward that adds in place after it, `x += ...`)."""
        for name, value, version in self.__dict__.get("_px_watched", []):
            if value._version != version:
                raise PrismaError(
                    f"site {name}: the module changed this tensor in place after the trace read it (its version "
                    f"counter went from {version} to {value._version}), so what was read is not what the site "
                    "computed: a forward that adds in place after the site (`x += ...`), or an edit made after a "
                    "later site was read. An adapter maps such a site with Site(..., copy=True), which reads a "
                    "copy")

    def set_site(self, name: str, value: Tensor, *, tokens_change: bool = False) -> None:
        """Replace site `name`'s value (inside a trace); `value` in TL layout, broadcastable to
        the site's shape (e.g. one [d_model] vector for every token). `tokens_change=True` lets a
        [batch, pos, ...] site take a value with another number of tokens (an appended register
        token, say), where the modules after it accept one; an in-place site cannot."""
        site = self._lookup(name)
        envoy = self._enter(name, site)
        named = site.port not in ("output", "input")  # a value a swapped forward serves
        location = f"{envoy.path}.{site.port}"
        raw = Mediator.value(location) if named else getattr(envoy, site.port)
        current = site.view.read(raw)
        if tokens_change:
            value = _conform_tokens(name, site, value, current)
        else:
            value = _conform(name, site, value, current)
        if site.in_place:
            current.copy_(value)
            self._px_note_own_write(current)
        elif named:
            Mediator.swap(location, site.view.write(value, raw))
        else:
            setattr(envoy, site.port, site.view.write(value, raw))

    def skips_as_output(self, name: str) -> bool:
        """Whether site `name` is a whole module's output as is (output port, identity view, no
        prepare step, not in place): then `skip_to(name, value)` can stand in for that module."""
        site = self._px_sites.get(name)
        return (site is not None and bool(site.module) and site.port == "output" and site.view.identity
                and site.prepare is None and not site.in_place and not site.copy)

    def skip_to(self, name: str, value: Tensor) -> None:
        """Inside a trace: do not run the module whose output is site `name`; `value` (TL layout =
        its raw layout, see `skips_as_output`) is its output instead (nnsight's `skip`)."""
        if not self.skips_as_output(name):
            raise PrismaError(f"skip_to({name!r}, ...): the site is not a whole module's output as is, so the "
                              "module cannot be skipped in its favour")
        self._enter(name, self._lookup(name)).skip(value)

    def run_with_cache(self, images: Tensor, names_filter: NameFilter = None
                       ) -> tuple[Any, dict[str, Tensor]]:
        """Run on `images` and read sites: (output, {name: tensor}), detached, like TL's
        `run_with_cache`. `names_filter`: a name, a list, a predicate, or None for every site."""
        selected = self.select_sites(names_filter)
        with self.trace(images):
            cache = save({})
            self.prepare(selected)
            for name in selected:
                cache[name] = self.site(name).detach()
            output = save(self.output)
        return output, cache

    def select_sites(self, names: NameFilter = None) -> list[str]:
        """Site names chosen by a name, a list or a predicate (None: all), in forward order;
        unknown names raise UnknownNameError."""
        if names is None:
            chosen = self.site_names
        elif isinstance(names, str):
            chosen = [names]
        elif callable(names):
            chosen = [n for n in self._px_sites if names(n)]
        else:
            chosen = list(names)
        for name in chosen:
            self._lookup(name)
        return sorted(set(chosen), key=self._px_order.__getitem__)

    def _lookup(self, name: str) -> Site:
        site = self._px_sites.get(name)
        if site is None:
            why = self._not_mapped_reason(name)
            why = f" ({why})" if why else ""
            raise UnknownNameError(suggest(str(name), self._px_sites, "site") + why +
                                   f"; model.site_names lists the {len(self._px_sites)} sites of "
                                   f"this {type(self._module).__name__}")
        return site

    def _not_mapped_reason(self, name: Any) -> str:
        """Why a TL name has no site here ("" when it is simply unknown)."""
        last = name.rsplit(".", 1)[-1] if isinstance(name, str) else ""
        return f"{last} is not mapped here: {NOT_MAPPED[last]}" if last in NOT_MAPPED else ""

    def prepare(self, names: NameFilter = None) -> None:
        """Run the prepare steps of these sites now (inside a trace, before reading any site): a
        site whose prepare swaps the forward of a module that an earlier site sits in (an inline
        softmax served by `SwapForward` on its block) must be prepared before that module runs.
        `run_with_cache` and the analysis methods do this for the sites they read."""
        for name in self.select_sites(names):
            self._prepare(name, self._lookup(name))

    def _prepare(self, name: str, site: Site) -> None:
        if not self.interleaver.interleaving:
            raise PrismaError(f"model.site({name!r}) reads a running forward pass: use it inside "
                              "`with model.trace(images):` or a `tracer.invoke(images)` block")
        if site.prepare is not None:
            undo = site.prepare(self._module)
            if undo is not None:
                self._px_undo.append(undo)

    def _enter(self, name: str, site: Site) -> Any:
        """The envoy that serves `site`, after running its prepare step for this trace."""
        self._prepare(name, site)
        return self.get(envoy_path(site.module)) if site.module else self

    def preprocess(self, image: Any) -> Tensor:
        """An HxWx3 uint8 array or PIL image -> [1, 3, H, W], normalised as the source expects (on
        the model's device; a remote model's inputs stay on the CPU: real pixels, sent with it)."""

        from ..images import to_model_input

        return to_model_input(image, self.cfg).to(self.input_device)

    @property
    def input_device(self) -> Any:
        """Where inputs are made: the model's device, or the CPU for a model on meta (a remote
        model's inputs are real values, sent with the request)."""
        import torch

        return self.device if self.device.type != "meta" else torch.device("cpu")

    # ------------------------------------------------------------------ nnsight hooks
    def interleave(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """nnsight's run of one trace; afterwards undo what the sites prepared, even on error."""
        self.__dict__["_px_watched"] = []
        try:
            result = super().interleave(fn, *args, **kwargs)
            self._px_check_watched()
            return result
        finally:
            self.__dict__["_px_watched"] = []
            while self._px_undo:
                self._px_undo.pop()()


def envoy_path(path: str) -> str:
    """A module path as nnsight's envoys spell it: a submodule named like a value nnsight serves
    on every module (BERT's `output`) is the envoy's `E_output`."""
    import inspect

    from nnsight.intervention.envoy import Envoy

    return ".".join(f"{Envoy.OVERLOAD_PREFIX}{part}" if inspect.isdatadescriptor(getattr(Envoy, part, None))
                    else part for part in path.split("."))


class TracedViT(TracedModel):
    """A ViT classifier traced by nnsight. Every invoke takes images [batch, channels, H, W];
    several invokes in one trace run as one batch (`prisma_ext.traced.batching`)."""

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        return image_rows(inputs, kwargs, self._check_images)

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        return concat_invokes(invokes)

    def _check_images(self, images: Tensor) -> None:
        from ..hooked.inputs import check_images

        check_images(images, self.cfg)

    def site_shapes(self, batch_size: int = 1) -> dict[str, tuple[int, ...]]:
        """Every site name with its activation shape, from one traced forward pass on zeros."""
        import torch

        cfg = self.cfg
        x = torch.zeros(batch_size, cfg.in_chans, *cfg.img_size, device=self.input_device,
                        dtype=cfg.dtype)
        with torch.no_grad():
            _, cache = self.run_with_cache(x)
        return {name: tuple(t.shape) for name, t in cache.items()}


def _conform(name: str, site: Site, value: Any, current: Tensor) -> Tensor:
    """`value` on the site's device and dtype, broadcast to its shape, or InputError."""
    if not isinstance(value, Tensor):
        raise InputError(f"set_site({name!r}, ...) takes a tensor {site.shape}, got "
                         f"{type(value).__name__}")
    value = value.to(device=current.device, dtype=current.dtype)
    if value.shape == current.shape:
        return value
    try:
        return value.broadcast_to(current.shape).contiguous()
    except RuntimeError:
        raise InputError(f"set_site({name!r}, ...): the site is {site.shape} = "
                         f"{tuple(current.shape)} here, got {tuple(value.shape)}") from None


def _conform_tokens(name: str, site: Site, value: Any, current: Tensor) -> Tensor:
    """`value` [batch, any pos, ...] on the site's device and dtype, or InputError: the site's
    shape apart from its token axis (1), and not an in-place site."""
    if site.in_place:
        raise InputError(f"set_site({name!r}, ..., tokens_change=True): this site is the module's own tensor, "
                         "changed in place, so its number of tokens cannot change; edit another site")
    if not isinstance(value, Tensor) or value.ndim != current.ndim or current.ndim < 2 \
            or value.shape[:1] + value.shape[2:] != current.shape[:1] + current.shape[2:]:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise InputError(f"set_site({name!r}, ..., tokens_change=True): the site is {site.shape} = "
                         f"{tuple(current.shape)} here; a value may change only axis 1 (the tokens), got {shape}")
    return value.to(device=current.device, dtype=current.dtype)
