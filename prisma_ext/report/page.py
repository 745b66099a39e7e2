"""A self-contained HTML page: plotly.js inlined once, figures as divs, images as base64 PNG.

    page = Page("title")
    page.section("prediction", "Prediction")
    page.image(array, "caption"); page.table(rows, header); page.figure(fig)
    html = page.render()

Nothing on the page loads from the network. `page.n_figures` is written into the page as
`<meta name="prisma-ext-figures" content="N">`, so a test can check that every figure rendered.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..viz.overlay import png_base64

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330; }
header { background: #1d2330; color: #f2f4f8; padding: 1.2em 2em; }
header h1 { margin: 0 0 .3em 0; font-size: 1.6em; }
header p { margin: .2em 0; color: #c9cfdb; }
nav { padding: .6em 2em; background: #eef1f6; position: sticky; top: 0; z-index: 10; }
nav a { margin-right: 1.2em; color: #2a4d8f; text-decoration: none; font-size: .95em; }
main { padding: 0 2em 3em 2em; max-width: 1400px; }
section { border-bottom: 1px solid #dde2ea; padding: 1em 0 1.5em 0; }
h2 { margin-bottom: .3em; }
p.note { color: #4a5568; max-width: 60em; }
p.skipped { color: #9b2c2c; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
figure { margin: 0; }
figcaption { font-size: .85em; color: #4a5568; text-align: center; }
img.pixels { image-rendering: pixelated; }
table { border-collapse: collapse; font-size: .9em; margin: .5em 0; }
th, td { padding: .25em .7em; border-bottom: 1px solid #dde2ea; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
th { background: #eef1f6; }
tr.best td { font-weight: 600; }
.plot { margin: .5em 0; }
footer { padding: 1em 2em; color: #4a5568; font-size: .85em; }
"""


def _is_text(value: Any) -> bool:
    """Left-aligned cells: strings that are not numbers like '12.5%'."""
    return isinstance(value, str) and not re.fullmatch(r"[-+]?[\d.]+%?", value.strip())


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return html.escape(str(value))


class Page:
    """An HTML page built section by section."""

    def __init__(self, title: str):
        self.title = title
        self.header: list[str] = []
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.footer: list[str] = []
        self.n_figures = 0

    def intro(self, text: str) -> None:
        """A line under the title (plain text)."""
        self.header.append(f"<p>{html.escape(text)}</p>")

    def section(self, anchor: str, title: str) -> None:
        if self.toc:
            self.parts.append("</section>")
        self.toc.append((anchor, title))
        self.parts.append(f'<section id="{html.escape(anchor)}"><h2>{html.escape(title)}</h2>')

    def note(self, text: str, css: str = "note") -> None:
        """A paragraph of plain text."""
        self.parts.append(f'<p class="{css}">{html.escape(text)}</p>')

    def raw(self, fragment: str) -> None:
        """Trusted HTML (built by this module's helpers)."""
        self.parts.append(fragment)

    def image(self, image: np.ndarray, caption: str, width: int = 260) -> str:
        """An inline PNG with a caption, shown `width` px wide (small images stay sharp)."""
        pixelated = ' class="pixels"' if image.shape[1] < width else ""
        return (f'<figure><img{pixelated} width="{width}" alt="{html.escape(caption)}" '
                f'src="data:image/png;base64,{png_base64(image)}"><figcaption>{html.escape(caption)}'
                f"</figcaption></figure>")

    def images(self, items: Sequence[tuple[np.ndarray, str]], width: int = 260) -> None:
        self.parts.append('<div class="row">' + "".join(self.image(im, cap, width) for im, cap in items)
                          + "</div>")

    @staticmethod
    def table_html(rows: Sequence[Sequence[Any]], header: Sequence[str], best: int | None = None) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = []
        for i, row in enumerate(rows):
            css = ' class="best"' if best is not None and i == best else ""
            cells = "".join(f'<td class="text">{_cell(v)}</td>' if _is_text(v) else f"<td>{_cell(v)}</td>"
                            for v in row)
            body.append(f"<tr{css}>{cells}</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"

    def table(self, rows: Sequence[Sequence[Any]], header: Sequence[str], best: int | None = None) -> None:
        self.parts.append(self.table_html(rows, header, best))

    def dataframe(self, frame, digits: int = 4, collapse: str | None = None) -> None:
        """A pandas DataFrame as a table (index dropped); `collapse`: shown folded, under that summary."""
        rows = [[round(v, digits) if isinstance(v, float) else v for v in row]
                for row in frame.itertuples(index=False)]
        table = self.table_html(rows, [str(c) for c in frame.columns])
        self.parts.append(f"<details><summary>{html.escape(collapse)}</summary>{table}</details>" if collapse
                          else table)

    def figure(self, fig) -> None:
        """A plotly figure as a div; plotly.js itself is inlined once by `render`."""
        self.n_figures += 1
        # the title sits below plotly's toolbar (top right, about 30 px), so the toolbar covers none of it
        top = fig.layout.margin.t if fig.layout.margin.t is not None else 100
        fig.update_layout(title_y=1, title_yref="container", title_yanchor="top", title_pad_t=34,
                          margin_t=max(top, 80))
        div = fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                          div_id=f"figure-{self.n_figures}", config={"displaylogo": False})
        self.parts.append(f'<div class="plot" data-figure="{self.n_figures}">{div}</div>')

    def render(self) -> str:
        from plotly.offline import get_plotlyjs

        nav = "".join(f'<a href="#{html.escape(a)}">{html.escape(t)}</a>' for a, t in self.toc)
        body = "\n".join([*self.parts, "</section>" if self.toc else ""])
        return "\n".join([
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="prisma-ext-figures" content="{self.n_figures}">',
            f"<title>{html.escape(self.title)}</title>",
            f"<style>{CSS}</style>",
            f'<script type="text/javascript">{get_plotlyjs()}</script>',
            "</head><body>",
            f"<header><h1>{html.escape(self.title)}</h1>{''.join(self.header)}</header>",
            f"<nav>{nav}</nav>",
            f"<main>{body}</main>",
            f"<footer>{''.join(self.footer)}</footer>",
            "</body></html>",
        ])
