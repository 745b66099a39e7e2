"""Regenerate the parity table in docs/architectures.md from the code:

    .venv/bin/python scripts/parity.py

Every named configuration of timm, open_clip and the Hugging Face classes, built small with every
flag kept and every parameter randomised, loaded with px.load (which checks itself against the
source's own forward), and measured (tests/support/parity.py); the same statuses go to
prisma_ext/data/parity.json, which `prisma-ext models` lists. tests/docs/test_parity.py checks
the table against a fresh run, so it cannot drift.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from tests.support.parity import PACKAGED, all_rows, packaged, render, replace_section, summary

    start = time.perf_counter()
    rows = all_rows()
    doc = ROOT / "docs" / "architectures.md"
    doc.write_text(replace_section(doc.read_text(), render(rows)))
    PACKAGED.write_text(packaged(rows))
    print(f"{len(rows)} configurations in {time.perf_counter() - start:.0f} s: {summary(rows)}; wrote {doc} "
          f"and {PACKAGED.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
