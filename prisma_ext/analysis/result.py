"""The result object every analysis method returns: a tensor with named axes, the token layout,
labels, a plotly figure on the image's patch grid, and a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..errors import PrismaError
from ..layout import TokenLayout


@dataclass
class AnalysisResult:
    """`values` with axes named by `dims` (e.g. ("batch", "layer", "token", "class")).

    `coords` labels an axis (dim name -> one label per index; tokens are labelled from the
    layout), `class_names` names classes, `meta` keeps the method's settings. `grid()` turns the
    token (or patch) axis into the patch grid, dropping prefix tokens.
    """

    method: str
    values: Tensor
    dims: tuple[str, ...]
    layout: TokenLayout
    class_names: list[str] | None = None
    coords: dict[str, list] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, AnalysisResult] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.values.ndim != len(self.dims):
            raise PrismaError(f"{self.method}: {self.values.ndim} axes but dims {self.dims}")

    def __repr__(self) -> str:
        shape = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.values.shape))
        parts = f"; parts {', '.join(self.parts)}" if self.parts else ""
        return f"{type(self).__name__}({self.method}: {shape}{parts})"

    def part(self, name: str) -> AnalysisResult:
        """A related result with its own axes (`parts[name]`)."""
        if name not in self.parts:
            raise PrismaError(f"{self.method}: no part {name!r}; parts are {sorted(self.parts) or 'none'}")
        return self.parts[name]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def labels(self, dim: str) -> list:
        """Labels of one axis: coords if given, token labels for "token", else indices."""
        if dim in self.coords:
            return list(self.coords[dim])
        n = self.values.shape[self.dims.index(dim)]
        if dim == "token" and n == self.layout.n_tokens:
            return self.layout.token_labels()
        if dim == "patch" and n == self.layout.n_patches:
            return self.layout.token_labels()[self.layout.n_prefix:]
        if dim == "class" and self.class_names and len(self.class_names) == n:
            return list(self.class_names)
        return list(range(n))

    def select(self, **index: int) -> AnalysisResult:
        """The result at one index of the named axes (e.g. `select(batch=0, layer=3)`)."""
        values, dims = self.values, list(self.dims)
        for dim, i in index.items():
            if dim not in dims:
                raise PrismaError(f"{self.method}: no axis {dim!r}; axes are {tuple(dims)}")
            axis = dims.index(dim)
            values = values.select(axis, i)
            dims.pop(axis)
        coords = {d: v for d, v in self.coords.items() if d in dims}
        return AnalysisResult(self.method, values, tuple(dims), self.layout, self.class_names, coords, self.meta)

    def grid(self) -> Tensor:
        """Values with the token/patch axis moved last and reshaped to [..., rows, cols]."""
        lay = self.layout
        if "token" in self.dims:
            axis, start = self.dims.index("token"), lay.n_prefix
        elif "patch" in self.dims:
            axis, start = self.dims.index("patch"), 0
        else:
            raise PrismaError(f"{self.method}: no token or patch axis to put on the grid (axes {self.dims})")
        values = self.values.movedim(axis, -1)[..., start:start + lay.n_patches]
        return values.reshape(*values.shape[:-1], *lay.grid)

    def to_dataframe(self):
        """Long table: one column per axis (labelled) and a `value` column."""
        import itertools

        import pandas as pd

        labels = [self.labels(d) for d in self.dims]
        flat = self.values.detach().float().cpu().reshape(-1).tolist()
        rows = [(*combo, v) for combo, v in zip(itertools.product(*labels), flat)]
        return pd.DataFrame(rows, columns=[*self.dims, "value"])

    def plot(self, facet: str | None = None, title: str | None = None, **index: int):
        """A plotly figure. With a token/patch axis: heatmaps on the patch grid, one panel per
        index of `facet` (default: the one remaining axis, if any). Without: a heatmap of the two
        remaining axes (or a bar chart of one). Fix other axes with `index` (default 0)."""
        from ..viz.figures import result_figure

        return result_figure(self, facet=facet, title=title, **index)

