"""State a call may change only for its own duration: a module's train/eval mode, and one lock
per model so that calls from several threads run one forward pass at a time."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

from torch import nn

_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_guard = threading.Lock()


def lock_of(module: nn.Module) -> threading.RLock:
    """The lock of `module` (made on first use; kept while the module lives, never pickled with it)."""
    with _guard:
        lock = _locks.get(module)
        if lock is None:
            lock = _locks[module] = threading.RLock()
        return lock


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode inside the block, each submodule's own mode restored after (also on error)."""
    modes = [(m, m.training) for m in module.modules()]
    if any(training for _, training in modes):
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
