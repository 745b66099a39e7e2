"""Patch-grid maps drawn over the image they explain, one panel per map."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping

import numpy as np

MIN_SIDE = 224  # small images are enlarged (nearest neighbour) to at least this many pixels


def png_base64(image: np.ndarray) -> str:
    """An HxWx3 uint8 array as a base64-encoded PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")



def upscale(image: np.ndarray, side: int = MIN_SIDE) -> tuple[np.ndarray, int]:
    """The image enlarged by an integer factor to at least `side` pixels, and the factor."""
    k = max(1, -(-side // max(image.shape[:2])))
    return image.repeat(k, 0).repeat(k, 1), k


def grid_with_lines(image: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    """A copy of the image with the patch grid drawn in grey, enlarged for display."""
    big, k = upscale(image)
    out = big.copy()
    ph, pw = patch[0] * k, patch[1] * k
    out[::ph, :] = (out[::ph, :] * 0.5 + 90).astype(np.uint8)
    out[:, ::pw] = (out[:, ::pw] * 0.5 + 90).astype(np.uint8)
    return out


def paste_patches(clean: np.ndarray, corrupted: np.ndarray, patches: list[int], patch: tuple[int, int],
                  colour: tuple[int, int, int] = (255, 215, 0)) -> np.ndarray:
    """The corrupted image with the given patches (row-major indices) of the clean image pasted
    in, each outlined, enlarged for display."""
    ph, pw = patch
    cols = clean.shape[1] // pw
    out = corrupted.copy()
    for p in patches:
        r, c = divmod(p, cols)
        out[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = clean[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
    big, k = upscale(out)
    for p in patches:
        r, c = divmod(p, cols)
        y0, y1, x0, x1 = r * ph * k, (r + 1) * ph * k - 1, c * pw * k, (c + 1) * pw * k - 1
        big[y0:y1 + 1, [x0, x1]] = colour
        big[[y0, y1], x0:x1 + 1] = colour
    return big


def overlay_figure(image: np.ndarray | Mapping[str, np.ndarray], maps: Mapping[str, np.ndarray],
                   patch: tuple[int, int], title: str, cols: int | None = None, opacity: float = 0.6,
                   shared: str | None = None):
    """Each map [rows, cols] as a translucent heatmap over the image (HxWx3 uint8; or one image
    per map, keyed like `maps`), one panel each. Maps are scaled to [-1, 1] by their largest
    absolute value, so panels compare by shape, not by units; with `shared` (the colour bar's
    title), non-negative maps on one scale from 0 to the largest value of all, zero cells left
    clear. Hover shows the raw value."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(maps)
    per_map = isinstance(image, Mapping)
    sources = {}
    for name in names if per_map else names[:1]:
        big, k = upscale(image[name] if per_map else image)
        sources[name] = f"data:image/png;base64,{png_base64(big)}"
    top = max(float(np.asarray(m).max()) for m in maps.values()) or 1.0
    from .figures import balanced_columns, square_cells

    n_cols = min(cols, len(names)) if cols else balanced_columns(len(names))
    n_rows = -(-len(names) // n_cols)
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=names,
                        horizontal_spacing=0.02, vertical_spacing=0.08)
    ph, pw = patch[0] * k, patch[1] * k
    for i, name in enumerate(names):
        raw = np.asarray(maps[name], dtype=np.float64)
        scale = float(np.abs(raw).max()) or 1.0
        row, col = i // n_cols + 1, i % n_cols + 1
        fig.add_trace(go.Image(source=sources[name if per_map else names[0]], hoverinfo="skip"), row=row, col=col)
        colours = dict(zmin=0, zmax=top, colorscale="Viridis", colorbar=dict(title=shared, len=0.6)) if shared \
            else dict(zmin=-1, zmax=1, colorscale="RdBu_r", colorbar=dict(title="value / panel's<br>max |value|",
                                                                          len=0.6))
        z = np.where(raw > 0, raw, np.nan) if shared else raw / scale  # shared: zero cells left clear
        fig.add_trace(go.Heatmap(z=z, customdata=raw, x0=pw / 2, dx=pw, y0=ph / 2, dy=ph, opacity=opacity,
                                 showscale=i == 0, **colours,
                                 hovertemplate="value %{customdata:.4g}<extra>" + name + "</extra>"),
                      row=row, col=col)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    square_cells(fig)
    side = 260 if n_cols <= 4 else 200
    fig.update_layout(title=title, height=80 + side * n_rows, width=max(420, side * n_cols + 120),
                      margin=dict(l=10, r=10, t=70, b=10))
    return fig
