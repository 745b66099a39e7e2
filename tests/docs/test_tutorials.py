"""The tutorials in docs/tutorials run, as scripts, on the built-in models. (The python blocks
of README.md and docs/*.md are run by test_doc_snippets.py.)"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("[0-9][0-9]_*.py"))


def test_there_are_four_tutorials_in_percent_format():
    assert [p.name for p in TUTORIALS] == ["01_main_vit_demo.py", "02_patch_logit_lens.py",
                                          "03_attention_head_tour.py", "04_patching.py"]
    for path in TUTORIALS:
        text = path.read_text()
        assert "format_name: percent" in text and "# %% [markdown]" in text, path.name
        assert 'px.load("builtin:' in text, f"{path.name} should run on a built-in model"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert out.strip(), "a tutorial should print what it finds"
    assert list(tmp_path.iterdir()) == []  # it writes nothing

