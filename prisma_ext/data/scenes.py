"""Seeded scenes with captions: one coloured shape (or digit) per canvas, at a known position.

    scenes = make_scenes(512, seed=0, size=64)
    scenes.images    # float [n, 3, size, size] in [0, 1]
    scenes.labels    # long [n]: index into scenes.class_names
    scenes.masks     # bool [n, size, size]: the object's pixels
    scenes.captions  # ["a red circle", "a blue striped square", ...]

Colours come from a small named palette (jittered), so a caption can name them; `centres` and
`radii` say where each object is. The same arguments give the same tensors on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from torch import Tensor

BASIC_SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
SHAPES: tuple[str, ...] = BASIC_SHAPES + ("diamond", "ring")
DIGITS: tuple[str, ...] = tuple("0123456789")
FILLS: tuple[str, ...] = ("solid", "striped", "checkered")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.35, 0.95),
    "yellow": (0.95, 0.9, 0.15), "purple": (0.65, 0.25, 0.9), "cyan": (0.15, 0.85, 0.9),
    "pink": (1.0, 0.5, 0.75), "white": (0.95, 0.95, 0.95),
}
# 5 x 7 bitmaps of the digits, one string per row ("#" = ink)
_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
}


@dataclass(frozen=True)
class Scenes:
    """A batch of scenes; row i of every field describes image i."""

    images: Tensor  # float [n, 3, size, size] in [0, 1]
    labels: Tensor  # long [n], index into class_names
    masks: Tensor  # bool [n, size, size]
    captions: list[str]
    class_names: tuple[str, ...]
    colours: list[str]  # colour name per image (keys of COLOURS)
    fills: list[str]  # "solid", "striped" or "checkered" per image
    centres: Tensor  # float [n, 2]: (y, x) of the object's centre, in pixels
    radii: Tensor  # float [n]: the object's half-size, in pixels

    def __len__(self) -> int:
        return len(self.captions)


def shape_mask(kind: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Pixels of a shape of half-size `r`, given offsets from its centre."""
    import numpy as np

    if kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if kind == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if kind == "triangle":  # apex up, base at the bottom, as wide as it is tall
        return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    if kind == "cross":
        arm = max(r / 3, 1.0)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise InputError(f"unknown shape {kind!r}; expected one of {BASIC_SHAPES}")


def caption(name: str, colour: str, fill: str = "solid") -> str:
    """'a red circle', 'a blue striped square', 'a green 7' (no colour starts with a vowel)."""
    return f"a {colour} {'' if fill == 'solid' else fill + ' '}{name}"


def object_mask(name: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Pixels of a shape or digit of half-size `r`, given offsets from its centre."""
    import numpy as np

    if name in BASIC_SHAPES:
        return shape_mask(name, dy, dx, r)
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if name == "ring":
        d2 = dx ** 2 + dy ** 2
        return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
    if name in _GLYPHS:
        glyph = np.array([[c == "#" for c in row] for row in _GLYPHS[name]])
        half_w = r * 5 / 7
        row = np.floor((dy + r) / (2 * r) * 7).astype(int)
        col = np.floor((dx + half_w) / (2 * half_w) * 5).astype(int)
        inside = (row >= 0) & (row < 7) & (col >= 0) & (col < 5)
        return inside & glyph[row.clip(0, 6), col.clip(0, 4)]
    raise InputError(f"unknown object {name!r}; expected one of {SHAPES + DIGITS}")


def _texture(fill: str, yy: np.ndarray, xx: np.ndarray, period: float) -> np.ndarray:
    """1 where the fill shows the full colour, 0 where it shows the darker one."""
    import numpy as np

    if fill == "solid":
        return np.ones_like(yy, dtype=bool)
    if fill == "striped":
        return np.floor((yy + xx) / period) % 2 == 0
    if fill == "checkered":
        return (np.floor(yy / period) + np.floor(xx / period)) % 2 == 0
    raise InputError(f"unknown fill {fill!r}; expected one of {FILLS}")


def make_scenes(n: int, seed: int = 0, size: int = 64, classes: Sequence[str] | str = "shapes",
                colours: Sequence[str] | None = None, textures: bool = False,
                scale: tuple[float, float] = (0.14, 0.28), jitter: float = 0.08,
                background: float = 0.0, noise: float = 0.0) -> Scenes:
    """`n` captioned scenes of one object each (see `Scenes`).

    `classes`: "shapes" (SHAPES), "digits" (DIGITS) or a list of names from those; label i is
    `classes[i]`. `colours`: palette names (default: all of COLOURS), each jittered by up to
    `jitter` per channel. `textures`: fill objects striped or checkered as well as solid (the
    caption says which). `scale`: the object's half-size as a fraction of `size`. `background`:
    the canvas value; `noise`: std of Gaussian pixel noise everywhere (images stay in [0, 1]).
    """
    import numpy as np
    import torch

    names = {"shapes": SHAPES, "digits": DIGITS}.get(classes) if isinstance(classes, str) else tuple(classes)
    if names is None:
        raise InputError(f"classes must be 'shapes', 'digits' or a list of names, got {classes!r}")
    palette = tuple(COLOURS) if colours is None else tuple(colours)
    for name in names:
        if name not in SHAPES + DIGITS:
            raise InputError(f"unknown object {name!r}; expected some of {SHAPES + DIGITS}")
    for colour in palette:
        if colour not in COLOURS:
            raise InputError(f"unknown colour {colour!r}; expected some of {tuple(COLOURS)}")
    if n < 0 or size < 16 or not names or not palette:
        raise InputError(f"make_scenes needs n >= 0, size >= 16 and some classes and colours, "
                         f"got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(names), n)
    colour_idx = rng.integers(0, len(palette), n)
    fill_idx = rng.integers(0, len(FILLS), n) if textures else np.zeros(n, dtype=int)
    radii = rng.uniform(*scale, n) * size
    rgb = np.array([COLOURS[c] for c in palette])[colour_idx]
    rgb = np.clip(rgb + rng.uniform(-jitter, jitter, (n, 3)), 0.0, 1.0)
    centres = np.stack([rng.uniform(r, size - 1 - r, 2) for r in radii]) if n else np.zeros((0, 2))
    images = np.full((n, 3, size, size), background, dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):  # draw inside the object's bounding box only
        (cy, cx), r = centres[i], radii[i]
        y0, x0 = max(int(cy - r) - 1, 0), max(int(cx - r) - 1, 0)
        y1, x1 = min(int(cy + r) + 2, size), min(int(cx + r) + 2, size)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        mask = object_mask(names[labels[i]], yy - cy, xx - cx, r)
        bright = _texture(FILLS[fill_idx[i]], yy, xx, max(size / 16, 2.0))
        masks[i, y0:y1, x0:x1] = mask
        patch = np.where(bright, 1.0, 0.35)[None] * rgb[i][:, None, None]
        images[i, :, y0:y1, x0:x1] = np.where(mask[None], patch, images[i, :, y0:y1, x0:x1])
    if noise:
        images = np.clip(images + rng.normal(0.0, noise, images.shape), 0.0, 1.0).astype(np.float32)
    colour_names = [palette[k] for k in colour_idx]
    fills = [FILLS[k] for k in fill_idx]
    return Scenes(
        images=torch.from_numpy(images), labels=torch.from_numpy(labels).long(),
        masks=torch.from_numpy(masks),
        captions=[caption(names[y], c, f) for y, c, f in zip(labels, colour_names, fills)],
        class_names=names, colours=colour_names, fills=fills,
        centres=torch.from_numpy(centres).float(), radii=torch.from_numpy(radii).float())
