"""The tutorials in docs/tutorials: Jupytext percent scripts (the sources), each paired with a
notebook stored with its outputs (scripts/build_tutorials.py writes them). The notebooks match
their scripts cell by cell, and run without error on the built-in models in a fresh kernel.
(The python blocks of README.md and docs/*.md are run by test_doc_snippets.py.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("[0-9][0-9]_*.py"))
PLOTLY, PNG = "application/vnd.plotly.v1+json", "image/png"


def _build():
    """scripts/build_tutorials.py as a module: the tests execute notebooks as it does."""
    spec = importlib.util.spec_from_file_location("build_tutorials", ROOT / "scripts" / "build_tutorials.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def _outputs(nb) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def test_there_are_four_tutorials_in_percent_format_paired_with_notebooks():
    assert [p.name for p in TUTORIALS] == ["01_main_vit_demo.py", "02_patch_logit_lens.py",
                                          "03_attention_head_tour.py", "04_patching.py"]
    for path in TUTORIALS:
        text = path.read_text()
        assert "format_name: percent" in text and "# %% [markdown]" in text, path.name
        assert "formats: ipynb,py:percent" in text, f"{path.name} should name its paired notebook"
        assert 'px.load("builtin:' in text, f"{path.name} should run on a built-in model"
        assert path.with_suffix(".ipynb").is_file(), f"run scripts/build_tutorials.py for {path.name}"
    assert sorted((DOCS / "tutorials").glob("*.ipynb")) == [p.with_suffix(".ipynb") for p in TUTORIALS]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_notebook_is_in_sync_with_its_script(path):
    import jupytext

    script, notebook = jupytext.read(path), jupytext.read(path.with_suffix(".ipynb"))
    assert _cells(notebook) == _cells(script), \
        f"{path.with_suffix('.ipynb').name} differs from {path.name}: run scripts/build_tutorials.py"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_stored_notebook_has_its_outputs(path):
    """Stored executed top to bottom, without errors, figures as plotly JSON plus a PNG, < 2 MB."""
    import nbformat

    ipynb = path.with_suffix(".ipynb")
    assert ipynb.stat().st_size < 2_000_000
    nb = nbformat.read(ipynb, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "not executed in order"
    outputs = _outputs(nb)
    assert not [out for out in outputs if out.output_type == "error"]
    assert any(out.output_type == "stream" and out.name == "stdout" for out in outputs)
    figures = [out for out in outputs if PLOTLY in out.get("data", {})]
    assert figures, f"{ipynb.name} shows no figure"
    assert all(PNG in out.data for out in figures), "every plotly figure needs a PNG (GitHub shows it)"
    assert "cdn.plot.ly" not in ipynb.read_text() and "plotly.js v" not in ipynb.read_text()  # no inlined plotly.js


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_notebook_executes(path):
    """The stored notebook, outputs cleared, runs in a fresh python3 kernel of this interpreter
    (300 s per cell), in an empty folder it leaves empty, printing and drawing what it finds."""
    import nbformat

    nb = nbformat.read(path.with_suffix(".ipynb"), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    _build().execute(nb, png=False, timeout=300)  # raises on a cell error, or if it wrote a file
    outputs = _outputs(nb)
    assert any(out.output_type == "stream" and out.name == "stdout" for out in outputs), \
        "a tutorial should print what it finds"
    assert any(PLOTLY in out.get("data", {}) for out in outputs), "its figures should show in a notebook"
