"""Regenerate docs/tutorials/NN_name.ipynb from NN_name.py (Jupytext percent format) and execute
them in place, so the notebooks are stored with their outputs (printed tables and figures).

    .venv/bin/python scripts/build_tutorials.py              # every tutorial
    .venv/bin/python scripts/build_tutorials.py 02 04        # those whose names start so
    .venv/bin/python scripts/build_tutorials.py --no-execute # sources only (outputs dropped)
    .venv/bin/python scripts/build_tutorials.py --no-png     # plotly figures as JSON only

The .py files are the sources: edit them, then run this script. Each notebook runs in a fresh
python3 kernel of this interpreter, in a temporary folder (a tutorial writes nothing). Plotly
figures are stored twice in one output: plotly's JSON (interactive in Jupyter) and a static PNG
(what GitHub's notebook viewer shows), rendered offline by kaleido with the system's Chromium
(`bash scripts/setup.sh --test` installs it). Without either, pass --no-png.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"
KERNEL = "python3"  # jupyter_client runs it with this interpreter (sys.executable)


def sources(prefixes: list[str]) -> list[Path]:
    paths = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
    if prefixes:
        paths = [p for p in paths if any(p.name.startswith(x) for x in prefixes)]
    if not paths:
        raise SystemExit(f"build_tutorials: no tutorial matches {prefixes}")
    return paths


def notebook_of(py: Path):
    """The notebook of a percent script, with the python3 kernel and no outputs."""
    import jupytext

    nb = jupytext.read(py)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": KERNEL}
    nb.metadata.setdefault("language_info", {"name": "python"})
    return nb


def execute(nb, *, png: bool, timeout: int = 300):
    """Run every cell in a fresh kernel in a temporary folder; raises on the first error."""
    from nbclient import NotebookClient

    env = {"PLOTLY_RENDERER": "plotly_mimetype+png" if png else "plotly_mimetype",  # plotly reads it at import
           # tqdm.auto warns in a kernel without ipywidgets; the tutorials draw no progress bars
           "PYTHONWARNINGS": ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found"]))}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        with tempfile.TemporaryDirectory() as cwd:
            client = NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, record_timing=False,
                                    resources={"metadata": {"path": cwd}})
            client.execute()
            left = sorted(p.name for p in Path(cwd).iterdir())
            if left:
                raise RuntimeError(f"the notebook wrote files: {left}")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb


def check_png() -> None:
    """Fail early, with the fix, when plotly cannot render a PNG here."""
    import plotly.graph_objects as go
    import plotly.io as pio

    try:
        pio.to_image(go.Figure(go.Scatter(y=[0, 1])), format="png")
    except Exception as err:  # kaleido missing, or no Chromium for it
        raise SystemExit(f"build_tutorials: plotly cannot render PNGs here ({type(err).__name__}: {err}); "
                         "install kaleido (the dev extra) and Chromium (bash scripts/setup.sh --test), "
                         "or pass --no-png") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="tutorial name prefixes (default: all)")
    parser.add_argument("--no-execute", action="store_true", help="write the notebooks without outputs")
    parser.add_argument("--no-png", action="store_true", help="store plotly figures as JSON only")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell (default 300)")
    args = parser.parse_args(argv)

    import nbformat

    if not args.no_execute and not args.no_png:
        check_png()
    for py in sources(args.names):
        out = py.with_suffix(".ipynb")
        nb = notebook_of(py)
        if not args.no_execute:
            start = time.perf_counter()
            print(f"build_tutorials: executing {py.name}", file=sys.stderr, flush=True)
            execute(nb, png=not args.no_png, timeout=args.timeout)
            print(f"build_tutorials: {py.name} ran in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        nbformat.write(nb, out)
        print(f"build_tutorials: wrote {out.relative_to(ROOT)} ({out.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
