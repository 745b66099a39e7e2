"""The one reference patcher the sweeps are checked against: a plain torch hook on a module.

The base run's value at `module` (its output, or its first input) has the token `positions`
(and, for a [batch, pos, head, d_head] value, one `head`) replaced by the same module's value in
the source run. It knows nothing of prisma-ext's batching, restarts or nnsight: on a hooked model
pass the site's HookPoint (`model.mod_dict[name]`), on a source module the submodule itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def _value(port: str, args: tuple, output) -> Tensor:
    return args[0] if port == "input" else output


def reference_patch(module: nn.Module, run_source: Callable[[], object], run_base: Callable[[], object],
                    positions: Sequence[int], head: int | None = None, port: str = "output"):
    """(source run's output, patched base run's output). Hooks are removed when done."""
    stash: dict[str, Tensor] = {}
    if port == "input":
        handle = module.register_forward_pre_hook(lambda m, args: stash.update(value=args[0].detach().clone()))
    else:
        handle = module.register_forward_hook(lambda m, args, out: stash.update(value=out.detach().clone()))
    try:
        source_out = run_source()
    finally:
        handle.remove()
    index = (slice(None), list(positions)) + ((head,) if head is not None else ())

    def patched(value: Tensor) -> Tensor:
        value = value.clone()
        value[index] = stash["value"][index]
        return value

    if port == "input":
        handle = module.register_forward_pre_hook(lambda m, args: (patched(args[0]), *args[1:]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: patched(out))
    try:
        with torch.no_grad():
            base_out = run_base()
    finally:
        handle.remove()
    return source_out, base_out
