"""The parity table in docs/architectures.md is what the code does today: every named configuration
is rebuilt small, loaded (px.load checks itself against the source's own forward) and measured
again, and must have the documented status (reproduced, or refused with the same feature named)
and an error of the same size. Regenerate the table with `.venv/bin/python scripts/parity.py`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.parity import PACKAGED, TOLERANCE, all_rows, error_matches, parse

DOC = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"
TARGET = 330  # named configurations reproduced (the breadth issue's target)


def test_the_parity_table_matches_a_fresh_census():
    documented = {tuple(cells[:3]): cells for cells in parse(DOC.read_text())}
    rows = all_rows()
    fresh = {tuple(row.cells()[:3]): row for row in rows}
    assert set(documented) == set(fresh), ("rows added or gone; rerun scripts/parity.py",
                                           sorted(set(documented) ^ set(fresh))[:10])
    stale = [key for key, row in fresh.items() if documented[key][3] != row.status]
    assert not stale, ("status changed; rerun scripts/parity.py", [(k, fresh[k].status) for k in stale[:10]])
    drift = [key for key, row in fresh.items() if not error_matches(documented[key][4], row.error)]
    assert not drift, [(k, documented[k][4], fresh[k].error) for k in drift[:10]]
    reproduced = [row for row in rows if row.reproduced]
    assert all(row.error <= TOLERANCE for row in reproduced)
    assert len(reproduced) >= TARGET
    assert all(row.status.startswith("refused: ") and len(row.status) > len("refused: ") + 5
               for row in rows if not row.reproduced)  # every refusal names something


def test_the_packaged_statuses_are_the_tables():
    """`prisma-ext models` lists prisma_ext/data/parity.json: the same rows as the docs' table."""
    table = {(cells[0], cells[2].strip("`")): [cells[1].strip("`"), cells[3]] for cells in parse(DOC.read_text())}
    listed = {(family, name): entry for family, rows in json.loads(PACKAGED.read_text()).items()
              for name, entry in rows.items()}
    assert listed == table
