"""Which token positions a sweep patches: single tokens, prefix tokens, patch-grid masks, groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import PrismaError
from ...layout import TokenLayout


@dataclass(frozen=True)
class PositionGroups:
    """Groups of token indices patched together, one label each; `dim` names the result axis
    ("token" when every token is its own group, "patch" for every patch, else "position")."""

    groups: list[list[int]]
    labels: list[str]
    dim: str

    def __len__(self) -> int:
        return len(self.groups)

    def mask(self, n_tokens: int) -> torch.Tensor:
        """[n_groups, n_tokens] boolean: which tokens each group patches."""
        out = torch.zeros(len(self.groups), n_tokens, dtype=torch.bool)
        for i, group in enumerate(self.groups):
            out[i, group] = True
        return out


GRID_SPECS = ("prefix", "patches", "rows", "cols", "blocks")
MAX_BLOCKS = 7  # "blocks" without a size: blocks of k x k patches, k the smallest giving <= 7 x 7 blocks


def block_size(grid: tuple[int, int], most: int = MAX_BLOCKS) -> int:
    """The smallest k whose k x k blocks cover `grid` in at most `most` blocks per side."""
    return max(1, -(-max(grid) // most))


def _blocks(spec: str, first: int, rows: int, cols: int) -> PositionGroups:
    """"blocks" / "blocks:K": the patches in K x K blocks (the last row and column of blocks may
    be narrower), row by row, labelled by the patch rows and columns they cover."""
    size = spec.partition(":")[2]
    if size and not (size.isdigit() and int(size) >= 1):
        raise PrismaError(f"positions={spec!r}: the block size must be a positive integer, e.g. 'blocks:2'")
    k = int(size) if size else block_size((rows, cols))
    groups, labels = [], []
    for r0 in range(0, rows, k):
        for c0 in range(0, cols, k):
            r1, c1 = min(r0 + k, rows), min(c0 + k, cols)
            groups.append([first + r * cols + c for r in range(r0, r1) for c in range(c0, c1)])
            labels.append(f"rows {r0}-{r1 - 1}, cols {c0}-{c1 - 1}")
    return PositionGroups(groups, labels, "block")


def resolve_positions(spec, layout: TokenLayout, n_tokens: int | None = None, grid: bool = True) -> PositionGroups:
    """`spec`: "all" (each token), "prefix" (each prefix token), "patches" (each patch), "rows" /
    "cols" (each row / column of patches), "blocks:K" (K x K blocks of patches; "blocks": K
    chosen for at most 7 x 7 blocks), a boolean patch-grid mask [rows, cols] (one group), a
    list of token indices (each on its own), a list of lists (groups) or a dict label -> indices.
    grid=False (a text tower): tokens are labelled t0, t1, ... and the image-only specs are refused."""
    n_tokens = n_tokens or layout.n_tokens
    if not grid and (_is_mask(spec) or (isinstance(spec, str) and spec.partition(":")[0] in GRID_SPECS)):
        raise PrismaError(f"positions={spec if isinstance(spec, str) else 'a patch-grid mask'!r}: text has no "
                          "patch grid; use 'all', token indices, groups of indices or a dict label -> indices")
    image_labels = grid and n_tokens == layout.n_tokens
    labels = layout.token_labels() if image_labels else [f"t{i}" for i in range(n_tokens)]
    first, rows, cols = layout.n_prefix, *layout.grid

    def patch(r: int, c: int) -> int:
        return first + r * cols + c

    if isinstance(spec, str):
        if spec == "all":
            return PositionGroups([[i] for i in range(n_tokens)], labels, "token")
        if spec == "prefix":
            if not layout.n_prefix:
                raise PrismaError("positions='prefix': this model has no prefix tokens")
            return PositionGroups([[i] for i in range(first)], labels[:first], "position")
        if spec == "patches":
            return PositionGroups([[i] for i in range(first, n_tokens)], labels[first:], "patch")
        if spec == "rows":
            return PositionGroups([[patch(r, c) for c in range(cols)] for r in range(rows)],
                                  [f"row {r}" for r in range(rows)], "position")
        if spec == "cols":
            return PositionGroups([[patch(r, c) for r in range(rows)] for c in range(cols)],
                                  [f"col {c}" for c in range(cols)], "position")
        if spec.partition(":")[0] == "blocks":
            return _blocks(spec, first, rows, cols)
        raise PrismaError(f"unknown positions {spec!r}: use 'all', 'prefix', 'patches', 'rows', 'cols', 'blocks:K', a "
                          "patch-grid mask, a list of token indices or a list of groups")
    if isinstance(spec, dict):
        groups = [_indices(v, n_tokens, allow_empty=True) for v in spec.values()]
        return PositionGroups(groups, [str(k) for k in spec], "position")
    if _is_mask(spec):
        mask = torch.as_tensor(spec)
        if tuple(mask.shape) != (rows, cols):
            raise PrismaError(f"a position mask must have the patch grid's shape {(rows, cols)}, "
                              f"got {tuple(mask.shape)}")
        group = [patch(r, c) for r, c in mask.nonzero().tolist()]
        if not group:
            raise PrismaError("the position mask selects no patch")
        return PositionGroups([group], ["mask"], "position")
    if isinstance(spec, (bytes, float)) or not hasattr(spec, "__iter__"):
        raise PrismaError(f"positions: expected 'all', 'prefix', 'patches', 'rows', 'cols', a patch-grid mask, token "
                          f"indices, groups of them or a dict label -> indices, got {spec!r}")
    items = spec.tolist() if hasattr(spec, "tolist") else list(spec)
    if not items:
        raise PrismaError("no positions given")
    if all(isinstance(i, (int, np.integer)) for i in items):
        idx = _indices(items, n_tokens)
        return PositionGroups([[i] for i in idx], [labels[i] for i in idx], "position")
    groups = [_indices(g, n_tokens, allow_empty=True) for g in items]
    return PositionGroups(groups, [f"group {i}" for i in range(len(groups))], "position")


def _indices(values, n_tokens: int, allow_empty: bool = False) -> list[int]:
    """Token indices, checked; a group may be empty (it patches nothing: a control)."""
    out = [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    bad = [v for v in out if not 0 <= v < n_tokens]
    if bad or not (out or allow_empty):
        raise PrismaError(f"token indices must lie in [0, {n_tokens}), got {out}")
    return out


def _is_mask(spec) -> bool:
    return isinstance(spec, (torch.Tensor, np.ndarray)) and spec.dtype in (torch.bool, np.bool_)
