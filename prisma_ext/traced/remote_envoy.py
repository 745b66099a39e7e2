"""The envoy a remote trace sends: nnsight's own Hugging Face model class plus TL site names over
a plain site table, runnable on a server that has torch, transformers and nnsight but not
prisma-ext.

A remote (or simulated) request pickles the model envoy that the trace body refers to, with its
state; the server resolves the modules and the interleaver to its own (persistent ids) and runs
the body against that copy. So everything the copy needs must travel by value or be installed
there. This module and `remote_views` import nothing of prisma-ext but each other (only torch,
nnsight, the standard library, and transformers inside a function) and are registered with nnsight to be
pickled by value (`ship_by_value`), so their classes and functions travel as source. There each
function is rebuilt on its own (nnsight compiles its source at module level, with only the
globals it names): so no zero-argument `super()` here (no `__class__` cell once rebuilt) and no
module-level state shared between functions.

    RemoteSitesHF             nnsight's `HuggingFaceModel` (AutoModel: CLIPModel, CLIPVisionModel)
    RemoteSitesTransformers   nnsight's `TransformersModel` (a pipeline task: image-classification)

Both key as that nnsight class (`_remoteable_class`), so a server rebuilds the model with nnsight
alone, and both pickle as themselves, never as a prisma-ext subclass (`__reduce_ex__`): what the
caller holds is `prisma_ext.traced.remote.RemoteTracedCLIP` / `RemoteTracedViT`, whose prisma-ext
state (`_px_*`: adapter, configs, tokenizer) stays here.

The site table is `{tl_name: entry}` in forward order, each entry a dict of plain values:
`module` (dotted path; "" the root), `envoy` (the same path as nnsight's envoys spell it),
`port` ("output", "input" or "pattern"), `view` (a `remote_views` view tuple), `shape` (TL shape,
for errors), `in_place` (an assignment copies into the live tensor), `copy` (the body reads a
copy), `attention` (the pattern of a Hugging Face attention module: `explicit_attention_on` for
the trace) and `refused` ("" or why the site cannot run remotely).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from nnsight.intervention.batching import Batcher
from nnsight.intervention.eproperty import eproperty
from nnsight.intervention.interleaver import Mediator
from nnsight.intervention.util import first_input, replace_first_input
from nnsight.modeling.huggingface import HuggingFaceModel
from nnsight.modeling.transformers import TransformersModel
from torch import Tensor

from .remote_views import explicit_attention_on, read_view, write_view

NameFilter = str | Iterable[str] | Callable[[str], bool] | None
# per-process, per-trace state: rebuilt where a pickled model lands, never sent
_LOCAL_STATE = ("_rs_props", "_rs_undo", "_rs_watched")


def _new(cls: type) -> Any:
    """An uninitialised `cls` (unpickling then sets its state)."""
    return cls.__new__(cls)


def ship_by_value() -> None:
    """Register this module and `remote_views` with nnsight (cloudpickle) to be pickled by value,
    so a request carries their source. Idempotent; the registration lasts for the process and
    only changes how objects defined in these two modules are pickled."""
    import nnsight

    from . import remote_views

    nnsight.register(remote_views)
    nnsight.register(__name__)


class UnknownSiteError(ValueError, KeyError):
    """An unknown site name (the message lists the closest)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SiteTable:
    """TL sites over a plain site table, for an nnsight model class (mixed in first).

    `site(name)` (inside a trace) returns a site's live value in TL layout; `set_site(name,
    value)` replaces it; `site_names` lists the sites in forward order. `_rs_inputs` names the
    forward's (image, text) arguments, by which invokes batch.
    """

    _batcher_class = Batcher

    def _rs_init(self, sites: dict[str, dict], inputs: tuple[str | None, str | None],
                 towers: dict[str, str] | None = None) -> None:
        """Bind the site table, the (image, text) argument names and the towers' name prefixes."""
        self.__dict__.update(_rs_sites=dict(sites), _rs_inputs=tuple(inputs), _rs_towers=dict(towers or {}),
                             _rs_props={}, _rs_undo=[], _rs_watched=[])

    # ------------------------------------------------------------------ pickling
    def __reduce_ex__(self, protocol: int) -> tuple:
        """Pickle as the wire class (the first class in the MRO that sets `_RS_WIRE`), with the
        nnsight envoy state and the site table but nothing of prisma-ext (`_px_*`)."""
        wire = next(c for c in type(self).__mro__ if c.__dict__.get("_RS_WIRE"))
        state = {k: v for k, v in self.__getstate__().items()
                 if not k.startswith("_px_") and k != "default_remote"}
        state.update({k: [] for k in _LOCAL_STATE}, _rs_props={})
        wire_modules = (wire.__module__, read_view.__module__)
        for key, value in state.items():
            module = type(value).__module__
            if module.split(".")[0] == "prisma_ext" and module not in wire_modules:
                raise TypeError(f"{wire.__name__}: the envoy state {key!r} holds a {module}.{type(value).__name__}, "
                                "which a server without prisma-ext cannot rebuild")
        return _new, (wire,), state

    # ------------------------------------------------------------------ what is here
    @property
    def site_names(self) -> list[str]:
        """The site names, in forward order."""
        return list(self.__dict__["_rs_sites"])

    def select_sites(self, names: NameFilter = None) -> list[str]:
        """Site names chosen by a name, a list or a predicate (None: all), in forward order."""
        table = self.__dict__["_rs_sites"]
        if names is None:
            chosen = [n for n, entry in table.items() if not entry["refused"]]
        elif isinstance(names, str):
            chosen = [names]
        elif callable(names):
            chosen = [n for n in table if names(n)]
        else:
            chosen = list(names)
        for name in chosen:
            self._rs_lookup(name)
        order = {n: i for i, n in enumerate(table)}
        return sorted(set(chosen), key=order.__getitem__)

    def _rs_lookup(self, name: str) -> dict:
        table = self.__dict__["_rs_sites"]
        entry = table.get(name) if isinstance(name, str) else None
        if entry is None:
            near = difflib.get_close_matches(str(name), list(table), n=3)
            hint = f"; closest: {', '.join(near)}" if near else ""
            raise UnknownSiteError(f"unknown site {name!r}{hint}; model.site_names lists the {len(table)} sites")
        if entry["refused"]:
            raise ValueError(f"site {name} cannot run remotely: {entry['refused']}")
        return entry

    # ------------------------------------------------------------------ sites
    def site(self, name: str) -> Tensor:
        """The live value of site `name` in TL layout (inside a trace): `.save()` it, edit it in
        place before the body reads a later site, or take its `.grad`. Read sites in forward order."""
        entry = self._rs_lookup(name)
        envoy = self._rs_enter(name, entry)
        props = self.__dict__.setdefault("_rs_props", {})
        if name not in props:
            props[name] = _site_property(name, entry, self._rs_watch)
        return props[name].__get__(envoy)

    def set_site(self, name: str, value: Tensor, *, tokens_change: bool = False) -> None:
        """Replace site `name`'s value (inside a trace), in TL layout, broadcastable to the site's
        shape; `tokens_change=True` lets a [batch, pos, ...] site take another number of tokens."""
        entry = self._rs_lookup(name)
        envoy = self._rs_enter(name, entry)
        port, view = entry["port"], entry["view"]
        named = port not in ("output", "input")
        location = f"{envoy.path}.{port}"
        raw = Mediator.value(location) if named else getattr(envoy, port)
        current = read_view(view, raw)
        value = _conform_tokens(name, entry, value, current) if tokens_change else _conform(name, entry, value, current)
        if entry["in_place"]:
            current.copy_(value)
            self._rs_note_own_write(current)
        elif named:
            Mediator.swap(location, write_view(view, value, raw))
        else:
            setattr(envoy, port, write_view(view, value, raw))

    def prepare(self, names: NameFilter = None) -> None:
        """Prepare these sites now (inside a trace, before reading any): a pattern site switches
        its attention module, which must happen before that module runs."""
        for name in self.select_sites(names):
            self._rs_prepare(name, self._rs_lookup(name))

    def _rs_prepare(self, name: str, entry: dict) -> None:
        if not self.interleaver.interleaving:
            raise RuntimeError(f"model.site({name!r}) reads a running forward pass: use it inside "
                               "`with model.trace(...):` or a `tracer.invoke(...)` block")
        if entry["attention"]:
            undo = explicit_attention_on(self._module.get_submodule(entry["module"]))
            if undo is not None:
                self.__dict__.setdefault("_rs_undo", []).append(undo)

    def _rs_enter(self, name: str, entry: dict) -> Any:
        """The envoy that serves the site, after its prepare step for this trace."""
        self._rs_prepare(name, entry)
        return self.get(entry["envoy"]) if entry["module"] else self

    # ------------------------------------------------------------------ in-place changes after a read
    def _rs_watch(self, name: str, value: Tensor) -> None:
        """Remember a site's tensor and its version when it goes back to the model."""
        self.__dict__.setdefault("_rs_watched", []).append((name, value, value._version))

    def _rs_note_own_write(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage().data_ptr()
        watched = self.__dict__.setdefault("_rs_watched", [])
        for i, (name, value, _) in enumerate(watched):
            if value.untyped_storage().data_ptr() == storage:
                watched[i] = (name, value, value._version)

    def _rs_check_watched(self) -> None:
        for name, value, version in self.__dict__.get("_rs_watched", []):
            if value._version != version:
                raise RuntimeError(
                    f"site {name}: the module changed this tensor in place after the trace read it (version "
                    f"{version} -> {value._version}), so what was read is not what the site computed")

    # ------------------------------------------------------------------ nnsight hooks
    def interleave(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """nnsight's run of one trace; afterwards undo what the sites prepared, even on error."""
        self.__dict__["_rs_watched"] = []
        try:
            # explicit: a function rebuilt from its source (by value) has no __class__ cell
            result = super(SiteTable, self).interleave(fn, *args, **kwargs)  # noqa: UP008
            self._rs_check_watched()
            return result
        finally:
            self.__dict__["_rs_watched"] = []
            undo = self.__dict__.setdefault("_rs_undo", [])
            while undo:
                undo.pop()()

    def _rs_bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """An invoke's arguments by the names of the module's forward (only those passed)."""
        signature = inspect.signature(type(self._module).forward)
        try:
            bound = signature.bind_partial(None, *args, **kwargs)
        except TypeError as err:
            raise ValueError(f"{type(self._module).__name__}.forward: {err}") from None
        named = dict(bound.arguments)
        named.pop(next(iter(signature.parameters)))  # self
        for key in list(named):  # the **kwargs of Hugging Face forwards
            if signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
                named.update(named.pop(key))
        return {k: v for k, v in named.items() if v is not None}

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        """Rows an invoke adds: its images, else its token ids (0 for an empty invoke)."""
        named = self._rs_bind(inputs, kwargs)
        image, text = self.__dict__["_rs_inputs"]
        counts = []
        for key, ndim, what in ((image, 4, "images [batch, channels, H, W]"), (text, 2, "token ids [batch, pos]")):
            if key is not None and key in named:
                value = named[key]
                if not isinstance(value, Tensor) or value.ndim != ndim or (ndim == 2 and value.is_floating_point()):
                    got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"{key}= takes {what}, got {got}")
                counts.append(int(value.shape[0]))
        if not counts and named:
            names = " and/or ".join(f"{k}=" for k in (image, text) if k)
            raise ValueError(f"an invoke needs {names}; got only {sorted(named)}")
        return counts[0] if counts else 0

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        """One forward call from several invokes: tensors concatenated along dim 0 in invoke
        order (images and prompts of one invoke are pairs), other arguments equal."""
        if len(invokes) <= 1:
            return invokes[0] if invokes else ((), {})
        bound = [self._rs_bind(args, kwargs) for args, kwargs in invokes]
        keys = set(bound[0])
        data = [k for k in self.__dict__["_rs_inputs"] if k in keys]
        for i, named in enumerate(bound):
            if set(named) != keys:
                raise ValueError(f"invokes in one trace run as one batch, so they must pass the same inputs: "
                                 f"invoke 0 passes {sorted(keys)}, invoke {i} {sorted(named)}")
            if len(data) == 2 and named[data[0]].shape[0] != named[data[1]].shape[0]:
                raise ValueError(f"with several invokes each invoke's images and prompts are pairs: invoke {i} "
                                 f"has {named[data[0]].shape[0]} and {named[data[1]].shape[0]}")
        return (), {key: _merge(key, [named[key] for named in bound]) for key in bound[0]}


def _merge(key: str, values: list[Any]) -> Any:
    first = values[0]
    if not isinstance(first, Tensor):
        if any(v is not first and v != first for v in values[1:]):
            raise ValueError(f"invokes in one trace run as one batch: {key}= must be the same in every invoke")
        return first
    for i, t in enumerate(values[1:], 1):
        if not isinstance(t, Tensor) or t.shape[1:] != first.shape[1:] or t.dtype != first.dtype \
                or t.device != first.device:
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"invokes in one trace run as one batch, so their {key} must match: invoke 0 has "
                             f"{tuple(first.shape)} {first.dtype} on {first.device}, invoke {i} has {got}")
    return torch.cat(values, dim=0)


def _site_property(name: str, entry: dict, watch: Callable[[str, Tensor], None]) -> eproperty:
    """An eproperty serving the site in TL layout; its transform hands the (possibly edited) TL
    tensor back to the model, so in-place edits and `.grad` are real (as `TracedModel.site`)."""
    view, copy, port = entry["view"], entry["copy"], entry["port"]
    prop = eproperty(key=port)

    def handed_back(value: Tensor) -> Tensor:
        watch(name, value)
        return value.clone() if copy else value

    if port != "input":
        def served(host: Any, raw: Any) -> Tensor:
            value = read_view(view, raw)
            return value.clone() if copy else value

        def written(host: Any, value: Tensor, raw: Any) -> Any:
            return write_view(view, handed_back(value), raw)
    else:
        def served(host: Any, raw: Any) -> Tensor:
            value = read_view(view, first_input(*raw))
            return value.clone() if copy else value

        def written(host: Any, value: Tensor, raw: Any) -> Any:
            args, kwargs = raw
            return replace_first_input(args, kwargs, write_view(view, handed_back(value), first_input(args, kwargs)))
    prop(served)
    prop.transform(written)
    return prop


def _conform(name: str, entry: dict, value: Any, current: Tensor) -> Tensor:
    """`value` on the site's device and dtype, broadcast to its shape."""
    if not isinstance(value, Tensor):
        raise TypeError(f"set_site({name!r}, ...) takes a tensor {entry['shape']}, got {type(value).__name__}")
    value = value.to(device=current.device, dtype=current.dtype)
    if value.shape == current.shape:
        return value
    try:
        return value.broadcast_to(current.shape).contiguous()
    except RuntimeError:
        raise ValueError(f"set_site({name!r}, ...): the site is {entry['shape']} = {tuple(current.shape)} here, "
                         f"got {tuple(value.shape)}") from None


def _conform_tokens(name: str, entry: dict, value: Any, current: Tensor) -> Tensor:
    """`value` [batch, any pos, ...] on the site's device and dtype: only axis 1 may change."""
    if entry["in_place"]:
        raise ValueError(f"set_site({name!r}, ..., tokens_change=True): this site is the module's own tensor, "
                         "changed in place, so its number of tokens cannot change")
    if not isinstance(value, Tensor) or value.ndim != current.ndim or current.ndim < 2 \
            or value.shape[:1] + value.shape[2:] != current.shape[:1] + current.shape[2:]:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"set_site({name!r}, ..., tokens_change=True): the site is {entry['shape']} = "
                         f"{tuple(current.shape)} here; a value may change only axis 1, got {shape}")
    return value.to(device=current.device, dtype=current.dtype)


class RemoteSitesHF(SiteTable, HuggingFaceModel):
    """nnsight's `HuggingFaceModel` (AutoModel: a CLIPModel or CLIPVisionModel checkpoint) with TL
    sites; keyed as `nnsight.modeling.huggingface.HuggingFaceModel`."""

    _RS_WIRE = True

    def _remoteable_class(self) -> type:
        return HuggingFaceModel

    @property
    def towers(self) -> dict[str, str]:
        """Tower -> the prefix its site names carry ({"visual": "visual.", "text": "text."}; a
        vision tower alone: {"visual": ""}), read by trace bodies such as `encode_image`'s."""
        return dict(self.__dict__.get("_rs_towers", {}))


class RemoteSitesTransformers(SiteTable, TransformersModel):
    """nnsight's `TransformersModel` (a pipeline task, e.g. image-classification for
    `ViTForImageClassification`) with TL sites; keyed as
    `nnsight.modeling.transformers.TransformersModel` (repo id, revision, task)."""

    _RS_WIRE = True

    def _remoteable_class(self) -> type:
        return TransformersModel
