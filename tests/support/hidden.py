"""prisma_ext made unimportable, as on an NDIF server (torch, transformers, nnsight; no prisma-ext).

nnsight's `remote="local"` hides "local" modules while it deserialises a request, but an
editable (or site-packages) install of prisma-ext is found again by its finder and silently
re-imported. These helpers hide it for real: the `prisma_ext*` entries leave `sys.modules` and a
meta-path finder refuses every `prisma_ext` import; both are undone on exit, also on error.

    with prisma_ext_hidden() as blocker:           # a server: build, deserialise, run
        ...
    with local_simulation_hides_prisma_ext() as hides:   # nnsight's remote="local", hidden for real
        with model.trace(..., remote="local"):
            ...
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from nnsight import save
from nnsight.tracing.backend import Backend

HIDDEN = "prisma_ext"


def _ours(name: str) -> bool:
    return name == HIDDEN or name.startswith(HIDDEN + ".")


class Blocker(importlib.abc.MetaPathFinder):
    """Refuses every `prisma_ext` import (`attempts` lists them); `checked`: importing it was
    tried inside the hide and raised."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self.checked = False

    def find_spec(self, name, path=None, target=None):
        if _ours(name):
            self.attempts.append(name)
            raise ModuleNotFoundError(f"blocked {name}: prisma_ext is hidden (a server without prisma-ext)",
                                      name=name)
        return None

    def insert(self) -> None:
        """Go first on sys.meta_path and check that prisma_ext cannot be imported now."""
        sys.meta_path.insert(0, self)
        try:
            importlib.import_module(HIDDEN)
        except ModuleNotFoundError:
            self.checked = True
        self.attempts.clear()
        if not self.checked:
            raise AssertionError("prisma_ext is still importable inside the hide")

    def remove(self) -> None:
        while self in sys.meta_path:
            sys.meta_path.remove(self)


@contextmanager
def prisma_ext_hidden() -> Iterator[Blocker]:
    """No `prisma_ext*` in sys.modules and none importable, inside; as before, after."""
    popped = {name: sys.modules.pop(name) for name in list(sys.modules) if _ours(name)}
    blocker = Blocker()
    try:
        blocker.insert()
        yield blocker
    finally:
        blocker.remove()
        for name in [n for n in sys.modules if _ours(n)]:
            del sys.modules[name]
        sys.modules.update(popped)


@contextmanager
def local_simulation_hides_prisma_ext() -> Iterator[list[Blocker]]:
    """nnsight's `remote="local"` with a `Blocker` added to its hide of local modules (the
    deserialise); yields the blockers used, one per simulated request."""
    from nnsight.intervention.backends.local import LocalSimulationBackend as Local

    hide, restore = Local._hide_local_modules, Local._restore
    used: list[Blocker] = []

    def hide_for_real(self):
        hidden = hide(self)  # prisma_ext* leave sys.modules here (nnsight's own hide)
        blocker = Blocker()
        hidden["blocker"] = blocker
        try:
            blocker.insert()
        except BaseException:
            blocker.remove()
            restore(self, hidden)
            raise
        used.append(blocker)
        return hidden

    def restore_all(self, hidden):
        blocker = hidden.pop("blocker", None)
        if blocker is not None:
            blocker.remove()
        restore(self, hidden)

    Local._hide_local_modules, Local._restore = hide_for_real, restore_all
    try:
        yield used
    finally:
        Local._hide_local_modules, Local._restore = hide, restore


@contextmanager
def live_classes_kept() -> Iterator[None]:
    """The by-value classes (`remote_envoy`, `remote_views`) as they were, after: deserialising a
    request in the process that sent it maps cloudpickle's classes back onto these live ones and
    sets the methods rebuilt from source on them (functions without a `__module__`, which every
    later request then pickles with a scan of sys.modules). A server in its own process never
    touches the client's classes; this keeps the in-process stand-in from doing so."""
    from prisma_ext.traced import remote_envoy, remote_views

    classes = [c for m in (remote_envoy, remote_views) for c in vars(m).values()
               if isinstance(c, type) and c.__module__ == m.__name__]
    kept = {c: dict(vars(c)) for c in classes}
    try:
        yield
    finally:
        for cls, attrs in kept.items():
            for name in [n for n in vars(cls) if n not in attrs]:
                delattr(cls, name)
            for name, value in attrs.items():
                if vars(cls).get(name) is not value and name not in ("__dict__", "__weakref__"):
                    setattr(cls, name, value)


class HiddenServer(Backend):
    """What an NDIF worker does with a request, on a machine without prisma-ext: deserialise it
    against the server model's persistent objects (its modules, its interleaver), run the body
    against the envoy that came with it, and hand back what the body bound of `names` (saved, as
    nnsight's RemoteBackend does). Records the payload size, the bytes of the tensors handed back,
    the envoy's class and state, and the blocker."""

    def __init__(self, server, names: tuple[str, ...]):
        self.server, self.names = server, names
        self.payload = 0
        self.returned = 0  # bytes of the tensors handed back
        self.envoy_class: type | None = None
        self.envoy_state: dict = {}
        self.blocker: Blocker | None = None

    def __call__(self, tracer) -> None:
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.util import push

        blob = RequestModel.serialize(tracer)
        self.payload = len(blob)
        with live_classes_kept(), prisma_ext_hidden() as blocker:
            restored = RequestModel.deserialize(blob, self.server._remoteable_persistent_objects())
            self.envoy_class = type(restored.envoy)
            self.envoy_state = dict(restored.envoy.__dict__)
            restored.execute(restored.info.code)
            local = restored.info.frame.f_locals
            saved = {k: local[k] for k in self.names if k in local}  # those this body bound
        self.blocker = blocker
        from torch.utils._pytree import tree_flatten

        self.returned = sum(t.numel() * t.element_size() for t in tree_flatten(list(saved.values()))[0]
                            if hasattr(t, "element_size"))
        for value in saved.values():
            save(value)
        push(tracer.info.frame, saved)


# The server in a fresh interpreter: isolated (-I: no cwd, no PYTHONPATH, so neither prisma_ext's
# checkout nor the tests are on the path) and with the Blocker installed before anything imports.
# cloudpickle then rebuilds the envoy's classes from the source in the request (in this process it
# would map them back onto the live classes), which is what an NDIF server does.
_SERVER_SCRIPT = r"""
import importlib.abc, json, sys
class Blocker(importlib.abc.MetaPathFinder):
    attempts = []
    def find_spec(self, name, path=None, target=None):
        if name == "prisma_ext" or name.startswith("prisma_ext."):
            self.attempts.append(name)
            raise ModuleNotFoundError(f"blocked {name}: prisma_ext is hidden (a server without prisma-ext)", name=name)
sys.meta_path.insert(0, Blocker())
key, blob_path, out_path, names = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
import torch
from nnsight.modeling.mixins.remotable import Remotable
from nnsight.schema.request import RequestModel
server = Remotable.from_model_key(key, dispatch=True)
restored = RequestModel.deserialize(open(blob_path, "rb").read(), server._remoteable_persistent_objects())
envoy = type(restored.envoy)
state = sorted(restored.envoy.__dict__)
from nnsight.tracing.tracer import dec, inc  # a server opens the trace scope `.save()` needs
inc()
try:
    with torch.no_grad():
        restored.execute(restored.info.code)
finally:
    dec()
saved = {k: restored.info.frame.f_locals[k] for k in names if k in restored.info.frame.f_locals}
report = dict(server=f"{type(server).__module__}.{type(server).__name__}",
              envoy=[f"{c.__module__}.{c.__name__}" for c in envoy.__mro__], state=state,
              attempts=Blocker.attempts, prisma_modules=[m for m in sys.modules if m.split(".")[0] == "prisma_ext"])
torch.save({"saved": saved, "report": report}, out_path)
"""


class SubprocessServer(Backend):
    """A server in another interpreter without prisma-ext: builds the model from `key` with
    nnsight alone, deserialises and runs the request, sends back what the body bound of `names`;
    `report` says what it built and ran (classes, envoy state keys, import attempts)."""

    def __init__(self, key: str, names: tuple[str, ...], workdir):
        self.key, self.names, self.workdir = key, names, workdir
        self.payload = 0
        self.report: dict = {}

    def __call__(self, tracer) -> None:
        import json
        import subprocess

        import torch
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.util import push

        blob = RequestModel.serialize(tracer)
        self.payload = len(blob)
        blob_path, out_path = self.workdir / "request.bin", self.workdir / "result.pt"
        blob_path.write_bytes(blob)
        run = subprocess.run([sys.executable, "-I", "-c", _SERVER_SCRIPT, self.key, str(blob_path), str(out_path),
                              json.dumps(list(self.names))], cwd=self.workdir, capture_output=True, text=True,
                             timeout=300)
        if run.returncode:
            raise RuntimeError(f"the server process failed:\n{run.stderr[-4000:]}")
        result = torch.load(out_path, weights_only=False)
        self.report = result["report"]
        for value in result["saved"].values():
            save(value)
        push(tracer.info.frame, result["saved"])
