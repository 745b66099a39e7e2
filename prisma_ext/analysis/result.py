"""The result object every analysis method returns: a tensor with named axes, the token layout,
labels, a plotly figure on the image's patch grid, and a table."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
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

    def mean_over(self, dim: str) -> AnalysisResult:
        """The result averaged over one axis (e.g. "batch")."""
        if dim not in self.dims:
            raise PrismaError(f"{self.method}: no axis {dim!r}; axes are {self.dims}")
        axis = self.dims.index(dim)
        dims = self.dims[:axis] + self.dims[axis + 1:]
        coords = {d: v for d, v in self.coords.items() if d != dim}
        return replace(self, values=self.values.mean(axis), dims=dims, coords=coords, parts={})

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

    @classmethod
    def concat(cls, results: list[AnalysisResult]) -> AnalysisResult:
        """Results of consecutive chunks of one batch as one result: values (and parts) joined
        along their "batch" axis, and meta tensors with one row per image joined too."""
        first = results[0]
        if len(results) == 1:
            return first
        axis = first.dims.index("batch")
        sizes = [r.values.shape[axis] for r in results]
        values = torch.cat([r.values for r in results], dim=axis)
        meta = {}
        for key, value in first.meta.items():
            per_image = isinstance(value, Tensor) and value.ndim and value.shape[0] == sizes[0]
            meta[key] = torch.cat([r.meta[key] for r in results]) if per_image else value
        parts = {name: type(part).concat([r.parts[name] for r in results]) for name, part in first.parts.items()}
        return replace(first, values=values, meta=meta, parts=parts)

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



class ResultSet:
    """Several named results of one call (a patching sweep: site -> AnalysisResult), as a read-only
    mapping (`rs["z"]`, `rs.keys()`, `rs.items()`, `for site in rs`), with one table and one figure
    for them all. Each result's tensor is `rs[site].values`."""

    def __init__(self, results: dict[str, AnalysisResult]):
        self._results = dict(results)

    def __getitem__(self, name: str) -> AnalysisResult:
        if name not in self._results:
            raise PrismaError(f"no result {name!r}; results are {', '.join(self._results) or 'none'}")
        return self._results[name]

    def __iter__(self):
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def __contains__(self, name: object) -> bool:
        return name in self._results

    def keys(self):
        return self._results.keys()

    def items(self):
        return self._results.items()

    def results(self) -> list[AnalysisResult]:
        """The results, in order (what `dict.values()` would give)."""
        return list(self._results.values())

    def __getattr__(self, name: str):
        if name == "values":
            raise AttributeError("a ResultSet holds one AnalysisResult per name: use rs[name].values for a "
                                 "result's tensor, or rs.results() for the results")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: {v!r}" for k, v in self._results.items())
        return f"ResultSet({inner})"

    def to_dataframe(self):
        """One long table of every result, with a `site` column naming its result."""
        import pandas as pd

        frames = [r.to_dataframe().assign(site=site) for site, r in self._results.items()]
        return pd.concat(frames, ignore_index=True)

    def plot(self, facet: str | None = None, title: str | None = None, site: str | None = None, **index: int):
        """The figure of one result (`site`, default the first), as `AnalysisResult.plot` draws it."""
        result = self[site] if site is not None else next(iter(self._results.values()))
        return result.plot(facet=facet, title=title, **index)

    @property
    def meta(self) -> dict:
        return next(iter(self._results.values())).meta if self._results else {}
