"""The patching plan on its own: position specs on every token layout, layer and head specs, chunk
sizing and the job layout (no model runs), with random layouts drawn by hypothesis."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prisma_ext.analysis.patching.plan import (
    MAX_CHUNK,
    check_batch_size,
    default_batch_size,
    make_jobs,
    resolve_indices,
)
from prisma_ext.analysis.patching.positions import resolve_positions
from prisma_ext.errors import InputError, PrismaError
from prisma_ext.layout import TokenLayout

layouts = st.builds(lambda cls, dist, reg, rows, cols: TokenLayout(cls, dist, reg, (rows, cols), (4, 4),
                                                                  (4 * rows, 4 * cols)),
                    st.integers(0, 1), st.integers(0, 1), st.integers(0, 4), st.integers(1, 6), st.integers(1, 6))


def patch_index(layout: TokenLayout, r: int, c: int) -> int:
    return layout.n_prefix + r * layout.grid[1] + c


@settings(max_examples=60, deadline=None)
@given(layouts)
def test_grid_specs_cover_the_right_tokens(layout):
    rows, cols = layout.grid
    every = resolve_positions("all", layout)
    assert every.groups == [[i] for i in range(layout.n_tokens)] and every.dim == "token"
    assert every.labels == layout.token_labels()
    patches = resolve_positions("patches", layout)
    assert [g[0] for g in patches.groups] == list(range(layout.n_prefix, layout.n_tokens))
    by_rows = resolve_positions("rows", layout)
    by_cols = resolve_positions("cols", layout)
    assert len(by_rows) == rows and len(by_cols) == cols
    for r, group in enumerate(by_rows.groups):  # row r: every column of that row, left to right
        assert group == [patch_index(layout, r, c) for c in range(cols)]
    for c, group in enumerate(by_cols.groups):  # column c: top to bottom (not a mirrored grid)
        assert group == [patch_index(layout, r, c) for r in range(rows)]
    assert sorted(sum(by_rows.groups, [])) == sorted(sum(by_cols.groups, [])) == [g[0] for g in patches.groups]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[rows - 1, 0] = True  # bottom-left: row-major, so its index is (rows - 1) * cols
    assert resolve_positions(mask, layout).groups == [[patch_index(layout, rows - 1, 0)]]
    table = resolve_positions("rows", layout).mask(layout.n_tokens)
    assert table.shape == (rows, layout.n_tokens) and table.sum().item() == layout.n_patches
    if layout.n_prefix:
        prefix = resolve_positions("prefix", layout)
        assert prefix.groups == [[i] for i in range(layout.n_prefix)]
        assert prefix.labels == list(layout.prefix_names)
    else:
        with pytest.raises(PrismaError, match="no prefix tokens"):
            resolve_positions("prefix", layout)


def test_index_groups_dicts_and_their_errors():
    layout = TokenLayout(1, 0, 2, (2, 3), (4, 4), (8, 12))
    assert resolve_positions([0, 4], layout).labels == ["cls", "p0_1"]
    groups = resolve_positions([[0, 1], []], layout)
    assert groups.groups == [[0, 1], []] and groups.labels == ["group 0", "group 1"]
    named = resolve_positions({"object": [3, 4], "none": []}, layout)
    assert named.labels == ["object", "none"] and named.mask(9)[1].sum() == 0
    text = resolve_positions("all", layout, n_tokens=5, grid=False)
    assert text.labels == ["t0", "t1", "t2", "t3", "t4"]
    for bad, message in [([9], r"token indices must lie in \[0, 9\)"), ([], "no positions"),
                         ("diagonal", "unknown positions"), (torch.ones(3, 3, dtype=torch.bool), "grid's shape"),
                         (torch.zeros(2, 3, dtype=torch.bool), "selects no patch")]:
        with pytest.raises(PrismaError, match=message):
            resolve_positions(bad, layout)
    with pytest.raises(PrismaError, match="text has no patch grid"):
        resolve_positions("rows", layout, n_tokens=5, grid=False)


def test_layer_and_head_specs():
    assert resolve_indices(None, 4, "layers") == resolve_indices("all", 4, "layers") == [0, 1, 2, 3]
    assert resolve_indices(2, 4, "layers") == [2] and resolve_indices([3, 0], 4, "layers") == [3, 0]
    assert resolve_indices(torch.tensor([1, 2]), 4, "heads") == [1, 2]
    for bad, message in [([4], "must lie in"), ([-1], "must lie in"), ([1, 1], r"\[1\] given more than once"),
                         ([], "empty list"), ("first", "expected 'all'"), ([1.5], "expected ints"),
                         (True, "expected 'all'"), ([True], "expected ints")]:
        with pytest.raises(PrismaError, match=message):
            resolve_indices(bad, 4, "layers")


def test_batch_size_specs():
    assert check_batch_size(None) is None and check_batch_size(3) == 3
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(InputError, match="batch_size must be a positive int"):
            check_batch_size(bad)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 600), st.integers(8, 1024), st.integers(8, 4096), st.integers(1, 16),
       st.floats(1e3, 1e10))
def test_chunk_sizes_stay_within_the_budget(n_tokens, d_model, d_mlp, n_heads, budget):
    size = default_batch_size(n_tokens, d_model, d_mlp, n_heads, budget_bytes=budget)
    per_run = 4 * n_tokens * (3 * max(d_mlp, 3 * d_model) + 2 * n_heads * n_tokens)
    assert 1 <= size <= MAX_CHUNK
    assert size == 1 or size * per_run <= budget  # never over budget, unless one run is already
    assert size == MAX_CHUNK or (size + 1) * per_run > budget  # and as large as the budget allows
    assert default_batch_size(n_tokens, d_model, d_mlp, n_heads, budget_bytes=2 * budget) >= size


def test_default_budgets_by_device():
    cpu = default_batch_size(197, 384, 1536, 6, "cpu")
    assert 1 <= cpu < default_batch_size(197, 384, 1536, 6, "cuda")
    assert cpu == default_batch_size(197, 384, 1536, 6, budget_bytes=1e8)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.one_of(st.none(), st.lists(st.integers(0, 5), min_size=1,
                                                                        max_size=4, unique=True)),
       st.integers(1, 40))
def test_jobs_cover_every_run_once_in_chunks(n_examples, n_groups, heads, size):
    jobs = make_jobs(n_examples, n_groups, heads)
    n_heads = len(heads) if heads else 1
    assert len(jobs) == n_examples * n_groups * n_heads
    triples = list(zip(jobs.examples.tolist(), jobs.groups.tolist(), jobs.heads.tolist()))
    assert len(set(triples)) == len(triples)
    assert {h for _, _, h in triples} == (set(heads) if heads else {-1})
    chunks = list(jobs.chunks(size))
    assert all(0 < len(c) <= size for c in chunks)
    again = [t for c in chunks for t in zip(c.examples.tolist(), c.groups.tolist(), c.heads.tolist())]
    assert again == triples
