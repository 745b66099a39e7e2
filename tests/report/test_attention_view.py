"""The report's attention view: its data decodes back to the patterns (8 bits per row, relative
to the row's maximum), with the readout query's row after the token rows and prefix keys 0."""

from __future__ import annotations

import json
import re

import numpy as np

from prisma_ext.layout import TokenLayout
from prisma_ext.report.attention_view import attention_view, decode_rows, encode_rows


def test_rows_round_trip_within_half_a_level_of_their_maximum():
    rng = np.random.default_rng(0)
    rows = rng.dirichlet(np.ones(7), size=(3, 2, 5)).astype(np.float32)
    rows[0, 0, 0] = 0  # an all-zero row stays zero
    back = decode_rows(*encode_rows(rows), rows.shape)
    bound = rows.max(-1, keepdims=True) / 510 + 1e-7
    assert np.all(np.abs(back - rows) <= bound)
    assert np.all(back[0, 0, 0] == 0)


def test_the_view_holds_every_query_row_then_the_readout_row():
    layout = TokenLayout(1, 0, 1, (2, 3), (4, 4), (8, 12))  # cls, one register, 2 x 3 patches
    rng = np.random.default_rng(1)
    patterns = rng.dirichlet(np.ones(8), size=(2, 3, 8)).astype(np.float32)  # [layer, head, query, key]
    readout = rng.dirichlet(np.ones(6), size=(2, 3)).astype(np.float32)  # [layer, head, patch]
    fragment = attention_view(patterns, readout, np.zeros((8, 12, 3), np.uint8), layout)
    spec = json.loads(re.search(r'class="attention-data">(.*?)</script>', fragment, flags=re.S).group(1))
    assert (spec["tokens"], spec["prefix"], spec["grid"], spec["names"]) == (8, 2, [2, 3], ["cls", "reg0"])
    rows = decode_rows(spec["data"], spec["maxima"], (2, 3, 9, 8))
    np.testing.assert_allclose(rows[:, :, :8], patterns, atol=1 / 510)
    np.testing.assert_allclose(rows[:, :, 8, 2:], readout, atol=1 / 510)
    assert np.all(rows[:, :, 8, :2] == 0)
    for button in ('data-query="0">cls', 'data-query="1">reg0', 'data-query="8">readout'):
        assert button in fragment
