"""The weights a remote model's analysis reads, saved from the model itself (one trace) rather
than converted from a local copy: a remote model is built on the meta device and holds none.

The analysis reads a few weight-level quantities: the readout (final norm, head or CLIP
projection, an attention-pool head) and each attention layer's output map (W_O, b_O). Those TL
parameters are `FETCHED`; the rest (embeddings, norms inside blocks, W_Q/W_K/W_V, the MLPs, the
bulk of a model) are never downloaded and read as `Unfetched`, which names itself when a method
touches it.

Which source parameters a TL parameter comes from is measured, not listed per source: the
adapter's conversion and the weight processing run once on the meta module under
`SourceLineage`, which follows every tensor op from source parameter to TL parameter (a folded
bias keeps the biases folded into it). The parameters named are saved from one trace of the
remote model (`fetch`), and the conversion runs again with them real and the rest meta
(`MetaWins`): a TL parameter whose every source is real comes out real, exactly as the local
conversion computes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import PrismaError

# The TL parameters a remote model's analysis may read (a HookedViT's own names).
FETCHED = re.compile(r"^(ln_final\.|head\.|proj(\.|$)|attn_pool\.|blocks\.\d+\.attn\.proj\.)")


class Unfetched:
    """In place of a TL parameter that a remote model does not download: any use names it."""

    def __init__(self, name: str, shape: tuple[int, ...]):
        self._name, self._shape = name, shape

    def _refuse(self) -> PrismaError:
        return PrismaError(
            f"{self._name} {list(self._shape)} is not downloaded for a remote model: a remote run saves only "
            "the readout (final norm, head or projection) and each layer's W_O / b_O from the server, and this "
            "method needs more of the weights. Run it on a local model (backend='nnsight' without remote=, or "
            "backend='tl')")

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__") or item in ("_name", "_shape", "_refuse"):
            raise AttributeError(item)
        raise self._refuse()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        found = next(a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, Unfetched))
        raise found._refuse()

    def __repr__(self) -> str:
        return f"Unfetched({self._name})"


def _mutated(func: Any, args: tuple, kwargs: dict) -> Tensor | None:
    """The tensor an in-place op writes (`add_`, `copy_`, `x[...] = v`, `out=`), else None."""
    name = getattr(func, "__name__", "")
    if kwargs.get("out") is not None and isinstance(kwargs["out"], Tensor):
        return kwargs["out"]
    if (name.endswith("_") and not name.startswith("_")) or name in ("__setitem__", "__iadd__", "__isub__",
                                                                      "__imul__", "__itruediv__"):
        return args[0] if args and isinstance(args[0], Tensor) else None
    return None


class SourceLineage(TorchFunctionMode):
    """Follows which source parameters each tensor is computed from: `of(t)` is a set of names.
    Seed with `start(named_parameters)`; every op's outputs (and a tensor it writes in place)
    get the union of its tensor inputs' sets."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[int, frozenset[str]] = {}
        self._alive: list[Tensor] = []  # keeps ids from being reused while the mode runs

    def start(self, named: Iterable[tuple[str, Tensor]]) -> None:
        for name, tensor in named:
            self.sources[id(tensor)] = frozenset((name,))
            self._alive.append(tensor)

    def of(self, tensor: Tensor) -> frozenset[str]:
        return self.sources.get(id(tensor), frozenset())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if getattr(func, "__name__", "") in CONSTANTS:  # depends on a shape only
            inputs = []
        found = frozenset().union(*(self.of(t) for t in inputs)) if inputs else frozenset()
        result = func(*args, **kwargs)
        written = _mutated(func, args, kwargs)
        targets = [t for t in tree_flatten(result)[0] if isinstance(t, Tensor)]
        if written is not None:
            targets.append(written)
        for t in targets:
            self.sources[id(t)] = found | (self.of(t) if t is written else frozenset())
            self._alive.append(t)
        return result


# ops whose result depends on their input's shape only (a missing bias is zeros_like its parameter)
CONSTANTS = ("zeros_like", "ones_like", "full_like")


class MetaWins(TorchFunctionMode):
    """Runs ops on real tensors where all inputs are real and on meta where any is meta (a real
    input is moved to meta; a constant shaped like a meta tensor is real), so a conversion with
    some source parameters real computes exactly the outputs that depend on real ones only. A
    real tensor written in place from a meta value (`x[0] = meta`, `x += meta`) cannot become
    meta, so it is `tainted` and counts as meta from then on. A `copy_` of a real, untainted
    value into a meta parameter is kept in `assigned` (id of the parameter -> value) instead."""

    def __init__(self) -> None:
        super().__init__()
        self.assigned: dict[int, Tensor] = {}
        self.tainted: set[int] = set()
        self._alive: list[Tensor] = []  # keeps the tainted ids from being reused

    def _meta(self, t: Tensor) -> bool:
        return t.is_meta or id(t) in self.tainted

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if name in CONSTANTS and "device" not in kwargs:  # a constant: real
            return func(*args, **kwargs, device="cpu")
        written = _mutated(func, args, kwargs)
        if name == "copy_" and written is not None and written.is_meta:
            if not self._meta(args[1]):
                self.assigned[id(written)] = args[1].detach().clone()
            return written
        if not any(self._meta(t) for t in tensors) or all(t.is_meta for t in tensors):
            return func(*args, **kwargs)
        if written is not None and not written.is_meta:  # a real tensor written from a meta value
            self.tainted.add(id(written))
            self._alive.append(written)
            return written
        args, kwargs = tree_map(lambda t: t.to("meta") if isinstance(t, Tensor) else t, (args, kwargs))
        return func(*args, **kwargs)


def lineage(convert: Callable[[nn.Module], nn.Module], module: nn.Module) -> dict[str, frozenset[str]]:
    """TL parameter name -> the source parameters (names in `module`) it is computed from, for
    `convert(module)` (a HookedViT built on the meta device from `module`'s parameters)."""
    mode = SourceLineage()
    mode.start(module.named_parameters())
    with mode:
        built = convert(module)
    return {name: mode.of(param) for name, param in built.named_parameters()}


def partial_conversion(convert: Callable[[nn.Module], nn.Module], module: nn.Module,
                       fetched: dict[str, Tensor], device: Any = None) -> nn.Module:
    """`convert` run on a meta copy of `module` whose parameters named in `fetched` are those
    values: each TL parameter computed from fetched values only is real (on `device`); every
    other one is replaced by an `Unfetched` that names itself when used."""
    import copy

    source = copy.deepcopy(module)
    for name, value in fetched.items():
        owner, _, leaf = name.rpartition(".")
        holder = source.get_submodule(owner) if owner else source
        holder._parameters[leaf] = nn.Parameter(value.detach(), requires_grad=False)
    mode = MetaWins()
    with mode:
        built = convert(source)
    return settle(built, mode.assigned, device)


def settle(built: nn.Module, assigned: dict[int, Tensor], device: Any = None) -> nn.Module:
    """In place: each parameter of `built` with a value in `assigned` (by id) becomes that value
    (on `device`), and each other one still on meta an `Unfetched`; returns `built`."""
    for name, param in list(built.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        holder = built.get_submodule(owner) if owner else built
        value = assigned.get(id(param))
        if value is not None:
            holder._parameters[leaf] = nn.Parameter(value.to(device) if device is not None else value,
                                                    requires_grad=False)
        elif param.is_meta:
            del holder._parameters[leaf]
            holder.__dict__[leaf] = Unfetched(name, tuple(param.shape))
    return built


def needed_sources(sources: dict[str, frozenset[str]], wanted: re.Pattern = FETCHED) -> list[str]:
    """The source parameters the `wanted` TL parameters are computed from, in a stable order."""
    return sorted(set().union(*(s for name, s in sources.items() if wanted.match(name))))
