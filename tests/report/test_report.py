"""`prisma-ext report`: the bare command writes one self-contained HTML file that renders in
headless Chromium without a JavaScript error; bad input is one error line and leaves no file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prisma_ext import cli

ERROR_PREFIX = "prisma-ext: error: "
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr",
                  "--v=0", "--virtual-time-budget=10000", "--dump-dom")


@pytest.fixture(scope="module")
def bare_report(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`prisma-ext report` with no arguments, run in an empty folder."""
    folder = tmp_path_factory.mktemp("bare-report")
    res = subprocess.run([sys.executable, "-m", "prisma_ext.cli", "report"], cwd=folder, capture_output=True,
                         text=True, timeout=600)
    return folder, res


def _figure_count(html: str) -> int:
    found = re.search(r'<meta name="prisma-ext-figures" content="(\d+)">', html)
    assert found, "the report does not say how many figures it has"
    return int(found.group(1))


def test_bare_report_writes_one_self_contained_file(bare_report):
    folder, res = bare_report
    assert res.returncode == 0, res.stderr
    assert [p.name for p in folder.iterdir()] == ["report.html"]  # no temporary file left
    html = (folder / "report.html").read_text(encoding="utf-8")
    n = _figure_count(html)
    assert n >= 10
    assert html.count('data-figure="') == n
    assert html.count("Plotly.newPlot") == n
    assert len(re.findall(r"plotly\.js v\d", html)) == 1  # plotly.js inlined once
    assert not re.search(r"<script[^>]+src=", html)  # nothing loads from elsewhere
    assert not re.search(r"<(?:img|link)[^>]+(?:src|href)=\"https?:", html)
    assert "data:image/png;base64," in html
    for section in ("Prediction", "Patch logit lens", "Direct logit attribution", "CLS attribution",
                    "Attention heads", "Activation patching", "Compared with Captum"):
        assert f">{section}" in html, section
    assert "Not available for this model" not in html  # every section ran on the built-in model
    assert "[1/7]" in res.stderr and "wrote" in res.stderr  # progress on stderr
    assert res.stdout == ""


def test_a_vit_report_has_no_clip_section(bare_report):
    """The embedding split by head is a CLIP section (tests/report/test_clip_report.py)."""
    folder, res = bare_report
    assert res.returncode == 0, res.stderr
    html = (folder / "report.html").read_text(encoding="utf-8")
    assert 'id="embedding-by-head"' not in html and "split by head" not in html and "TextSpan" not in html


def test_report_renders_in_headless_chromium(bare_report, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: run `bash scripts/setup.sh --test` (as root) to install it")
    folder, res = bare_report
    assert res.returncode == 0, res.stderr
    page = folder / "report.html"
    n = _figure_count(page.read_text(encoding="utf-8"))
    run = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", page.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    plots = re.findall(r'<div[^>]*class="[^"]*\bjs-plotly-plot\b', dom)
    containers = re.findall(r'<div[^>]*class="[^"]*\bplot-container\b', dom)
    assert len(plots) == n, f"{len(plots)} of {n} figures rendered"
    assert len(containers) == n, f"{len(containers)} plot containers for {n} figures"
    assert len(re.findall(r'<svg[^>]*class="main-svg"', dom)) >= n
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert not console, "JavaScript console messages:\n" + "\n".join(console)
    _check_attention_view(page.read_text(encoding="utf-8"), dom)
    _check_screenshot(chromium, page, tmp_path)


def _check_screenshot(chromium: str, page: Path, tmp_path: Path) -> None:
    """A screenshot of the rendered page shows drawn figures, not a blank page."""
    import numpy as np
    from PIL import Image

    shot = tmp_path / "report.png"
    flags = [f for f in CHROMIUM_FLAGS if f != "--dump-dom"]
    run = subprocess.run([chromium, *flags, "--hide-scrollbars", "--window-size=1400,6000", f"--screenshot={shot}",
                          f"--user-data-dir={tmp_path / 'profile-shot'}", page.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (6000, 1400)
    inked = (pixels < 235).any(-1).mean()
    colours = len(np.unique(pixels.reshape(-1, 3)[::7], axis=0))
    assert inked > 0.15 and colours > 500, (inked, colours)


def _check_attention_view(html: str, dom: str) -> None:
    """The interactive attention view decoded its data in the browser and drew the default
    selection: the key it reports as the largest equals the one Python decodes from the same
    data (a transposed or mis-strided index in the page's script fails this)."""
    from prisma_ext.report.attention_view import decode_rows

    view = re.search(r'<div class="attention-view"[^>]*data-ready="1"[^>]*>', dom)
    assert view, "the attention view did not finish drawing"
    shown = re.search(r'data-shown="(-?\d+),(-?\d+),(-?\d+)"', view.group(0))
    argmax = int(re.search(r'data-argmax="(\d+)"', view.group(0)).group(1))
    spec = json.loads(re.search(r'<script type="application/json" class="attention-data">(.*?)</script>', html,
                                flags=re.S).group(1))
    rows = decode_rows(spec["data"], spec["maxima"], (spec["layers"], spec["heads"], spec["tokens"] + 1,
                                                      spec["tokens"]))
    layer, head, query = (int(g) for g in shown.groups())
    row = rows[layer, :, query].mean(0) if head < 0 else rows[layer, head, query]
    assert argmax == int(row.argmax()), (argmax, int(row.argmax()))


def plotly_figures(html: str) -> list[tuple[str, list, dict]]:
    """(div id, data, layout) of every `Plotly.newPlot` call in a page."""
    decoder, found = json.JSONDecoder(), []
    for call in re.finditer(r"Plotly\.newPlot\(\s*", html):
        div, i = decoder.raw_decode(html, call.end())
        parts = []
        for _ in range(2):
            i = re.compile(r"\s*,\s*").match(html, i).end()
            obj, i = decoder.raw_decode(html, i)
            parts.append(obj)
        found.append((div, *parts))
    return found


def _text(title) -> str:
    return ((title.get("text") if isinstance(title, dict) else title) or "").strip()


def figure_problems(data: list, layout: dict) -> list[str]:
    """What a reader would miss: a figure title, a colour bar's title, an axis title where the
    axis shows tick labels (a heatmap's, a bar chart's value axis, a line chart's both)."""
    problems = [] if _text(layout.get("title")) else ["no title"]
    axes = set()
    for trace in data:
        kind = trace.get("type", "scatter")
        if kind == "heatmap":
            if trace.get("coloraxis"):
                if not _text(layout.get(trace["coloraxis"], {}).get("colorbar", {}).get("title")):
                    problems.append("a colour bar without a title")
            elif trace.get("showscale", True) is not False and not _text(trace.get("colorbar", {}).get("title")):
                problems.append("a colour bar without a title")
        if kind == "heatmap" or (kind in ("bar", "scatter") and trace.get("x") not in (None, [None])):
            axes.add("yaxis" + trace.get("yaxis", "y")[1:])
            if kind != "bar":
                axes.add("xaxis" + trace.get("xaxis", "x")[1:])
    for axis in sorted(axes):
        spec = layout.get(axis, {})
        if spec.get("showticklabels") is not False and not _text(spec.get("title")):
            problems.append(f"{axis} shows ticks without a title")
    return problems


def test_every_figure_has_a_title_titled_colour_bars_and_titled_axes(bare_report):
    folder, res = bare_report
    assert res.returncode == 0, res.stderr
    figures = plotly_figures((folder / "report.html").read_text(encoding="utf-8"))
    assert len(figures) >= 10
    bad = {div: p for div, data, layout in figures if (p := figure_problems(data, layout))}
    assert not bad, bad


def test_the_figure_check_catches_a_missing_colour_bar_title():
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=[[0, 1], [1, 0]]), layout=dict(title="t", xaxis_title="x", yaxis_title="y"))
    assert figure_problems(*_data_layout(fig)) == ["a colour bar without a title"]
    fig.update_traces(colorbar_title="logit")
    fig.update_layout(yaxis_title=None)
    assert figure_problems(*_data_layout(fig)) == ["yaxis shows ticks without a title"]


def _data_layout(fig) -> tuple[list, dict]:
    spec = json.loads(fig.to_json())
    return spec["data"], spec["layout"]


# --------------------------------------------------------------------------- bad input


def _one_error_line(capsys, rc: int, *needles: str) -> str:
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX) and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_image(capsys, empty_cwd):
    rc = cli.main(["report", "--image", "no-such-photo.png"])
    _one_error_line(capsys, rc, "no-such-photo.png", "not found")
    assert list(empty_cwd.iterdir()) == []


def test_file_that_is_not_an_image(capsys, empty_cwd):
    (empty_cwd / "notes.png").write_text("not an image at all\n")
    rc = cli.main(["report", "--image", "notes.png"])
    _one_error_line(capsys, rc, "notes.png")
    assert [p.name for p in empty_cwd.iterdir()] == ["notes.png"]


def test_unknown_builtin_image(capsys, empty_cwd):
    rc = cli.main(["report", "--image", "builtin:circel"])
    _one_error_line(capsys, rc, "circel", "circle")
    assert list(empty_cwd.iterdir()) == []


def test_unknown_model(capsys, empty_cwd):
    rc = cli.main(["report", "--model", "timm:vit_nope"])
    _one_error_line(capsys, rc, "vit_nope")
    rc = cli.main(["report", "--model", "resnet50"])
    _one_error_line(capsys, rc, "resnet50")
    assert list(empty_cwd.iterdir()) == []


def test_unknown_class(capsys, empty_cwd):
    rc = cli.main(["report", "--target", "circel"])
    _one_error_line(capsys, rc, "circel", "circle")
    rc = cli.main(["report", "--target", "999"])
    _one_error_line(capsys, rc, "999", "out of range")
    assert list(empty_cwd.iterdir()) == []


def test_bad_corrupted_image_and_output_folder(capsys, empty_cwd):
    rc = cli.main(["report", "--corrupted", "missing.jpg"])
    _one_error_line(capsys, rc, "missing.jpg")
    rc = cli.main(["report", "--out", "no/such/folder/report.html"])
    _one_error_line(capsys, rc, "does not exist")
    (empty_cwd / "a-folder").mkdir()
    rc = cli.main(["report", "--out", "a-folder"])
    _one_error_line(capsys, rc, "is a directory")
    assert [p.name for p in empty_cwd.iterdir()] == ["a-folder"]


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    from prisma_ext.report import build as report

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        report.write_atomic(tmp_path / "report.html", "<html>" * 1000)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    report.write_atomic(tmp_path / "report.html", "<html></html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_the_default_output_never_replaces_a_file_nobody_named(tmp_path, monkeypatch):
    """`prisma-ext report` without --out replaced an existing report.html; now it picks the next
    free name and says so; a file named with --out is replaced, as asked."""
    from prisma_ext.report.build import default_out

    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.html").write_text("mine")
    (tmp_path / "report-1.html").write_text("mine too")
    assert default_out().name == "report-2.html"
    seen = []
    monkeypatch.setattr("prisma_ext.report.build.build_report", lambda *a, **k: seen.append(k["out"]))
    assert cli.main(["report"]) == 0 and seen[-1] is None  # the default: build_report picks the free name
    assert cli.main(["report", "--out", "report.html"]) == 0 and seen[-1] == "report.html"
    assert (tmp_path / "report.html").read_text() == "mine"


def test_a_photo_shown_to_a_built_in_model_is_called_out_of_distribution():
    from prisma_ext.report.build import prepare
    from prisma_ext.report.sections import out_of_distribution

    photo = prepare("builtin:shapes-vit", image="builtin:chelsea")
    warning = out_of_distribution(photo)
    assert warning.startswith("Out of distribution") and "builtin:chelsea" in warning
    assert photo.name(int(photo.probs.argmax())) in warning  # it names the answer it warns about
    assert out_of_distribution(prepare("builtin:shapes-vit", image="builtin:red-circle")) == ""


def test_the_timing_table_adds_up_to_its_total_which_the_command_prints(bare_report):
    folder, res = bare_report
    html = (folder / "report.html").read_text(encoding="utf-8")
    section = html[html.index('<section id="timing"'):]
    rows = re.findall(r"<tr[^>]*><td[^>]*>([^<]+)</td><td>([\d.]+)</td></tr>", section)
    parts = {name: float(value) for name, value in rows}
    total = parts.pop("total")
    assert {"start-up and imports", "loading", "writing the page"} <= set(parts)
    assert abs(sum(parts.values()) - total) <= 0.01 * len(parts)  # each part rounded to 0.01 s
    said = float(re.search(r"wrote .* in (\d+) s", res.stderr).group(1))
    assert abs(said - total) <= 1
