"""The CLIP report's section "The image embedding, split by head": present for a HookedCLIP,
its figure adding up to CLIP's own cosine with the target's prompt, its TextSpan table naming
the heads the figure ranks first, its high-norm summary stating the rule; a ViT report has no
such section (tests/report/test_report.py checks the bare ViT report)."""

from __future__ import annotations

import base64
import html as htmllib
import re

import numpy as np
import pytest
import torch

from tests.report.test_report import figure_problems, plotly_figures

ANCHOR = 'id="embedding-by-head"'


def plotted(spec) -> np.ndarray:
    """A trace's array as plotly writes it: a list, or {"dtype", "bdata" (base64), "shape"}."""
    if isinstance(spec, dict) and "bdata" in spec:
        values = np.frombuffer(base64.b64decode(spec["bdata"]), dtype=spec["dtype"])
        shape = spec.get("shape")
        return values.reshape([int(s) for s in str(shape).split(",")]) if shape else values
    return np.asarray(spec, dtype=float)


@pytest.fixture(scope="module")
def clip_report(tmp_path_factory):
    """The report of the built-in CLIP on its default scene, and the model it explained."""
    import prisma_ext as px
    from prisma_ext.report import build_report

    clip = px.load("builtin:shapes-clip")
    out = tmp_path_factory.mktemp("clip-report") / "clip.html"
    report = build_report(clip, out=out, log=None)
    return clip, report, out.read_text(encoding="utf-8")


def _section(page: str) -> str:
    start = page.index(ANCHOR)
    return page[start:page.index("<section", start + 1)]


def test_the_clip_report_splits_the_targets_cosine_by_head_and_it_adds_up(clip_report):
    import torch.nn.functional as F

    from prisma_ext.report.build import model_input

    clip, report, page = clip_report
    assert "The image embedding, split by head" in report.seconds
    section = _section(page)
    assert ">The image embedding, split by head</h2>" in section
    figures = plotly_figures(section)
    assert len(figures) == 2  # the decomposition and the high-norm summary
    _, data, layout = figures[0]
    heads = plotted(data[0]["z"])  # [layer, head]
    n_layers, n_heads = clip.visual.cfg.n_layers, clip.visual.cfg.n_heads
    assert heads.shape == (n_layers, n_heads)
    others = plotted(data[1]["y"])
    assert len(others) == 2 * n_layers + 2  # MLPs, attention biases, embedding, constant
    text = layout["meta"]["text"]
    assert text == "a square"  # the built-in CLIP's first template with the predicted class
    _, x = model_input(clip, "builtin:shapes-clip", None)
    with torch.no_grad():
        cosine = float(F.cosine_similarity(clip.encode_image(x), clip.encode_text([text])))
    assert abs(heads.sum() + others.sum() - cosine) < 1e-4  # the figure's parts: CLIP's own cosine
    assert abs(layout["meta"]["score"] - cosine) < 1e-4
    assert f"{cosine:.4f}" in htmllib.unescape(section)  # the prose states the same score

    # the TextSpan table: the three heads that add the most, in order, with their parts
    rows = re.findall(r"<tr><td class=\"text\">L(\d+)H(\d+)</td><td>([-\d.e]+)</td>"
                      r"((?:<td class=\"text\">[^<]*</td>){3})", section)
    assert len(rows) == 3
    order = np.argsort(-heads.flatten(), kind="stable")[:3]
    assert [(int(r[0]), int(r[1])) for r in rows] == [divmod(int(i), n_heads) for i in order]
    for layer, head, value, _ in rows:
        assert float(value) == pytest.approx(heads[int(layer), int(head)], abs=1e-4)
    for *_, texts in rows:
        picked = re.findall(r">([^<]*)<", texts)
        assert picked[0] and all(re.fullmatch(r"a (photo of a )?(square|circle|triangle|cross|diamond|ring)", t)
                                 for t in picked if t)


def test_the_clip_sections_high_norm_summary_states_its_rule(clip_report):
    _, _, page = clip_report
    section = htmllib.unescape(_section(page))
    assert "No high-norm tokens under the rule: a patch token is high-norm at a layer when" in section
    ratio = float(re.search(r"largest patch norm is ([\d.]+) x its image's median at most", section).group(1))
    assert 1 < ratio < 4  # below the rule's factor, as "no high-norm tokens" says
    _, data, layout = plotly_figures(_section(page))[1]
    maxima, medians = (plotted(t["y"]) for t in data[:2])
    assert (maxima / medians).max() < 4 and (maxima > medians).all()


def test_every_clip_report_figure_has_titles_and_the_section_sits_after_logit_attribution(clip_report):
    _, report, page = clip_report
    bad = {div: p for div, data, layout in plotly_figures(page) if (p := figure_problems(data, layout))}
    assert not bad, bad
    titles = list(report.seconds)
    assert titles.index("The image embedding, split by head") == titles.index("Direct logit attribution") + 1
    assert "Not available for this model" not in page
