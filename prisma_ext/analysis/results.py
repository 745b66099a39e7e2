"""A named collection of AnalysisResults (one per site of a sweep)."""

from __future__ import annotations

from .result import AnalysisResult


class ResultSet(dict):
    """site -> AnalysisResult, with one table and one figure for them all."""

    def to_dataframe(self):
        import pandas as pd

        frames = [r.to_dataframe().assign(site=site) for site, r in self.items()]
        return pd.concat(frames, ignore_index=True)

    def plot(self, site: str | None = None, **index: int):
        """The figure of one site's result (default: the first)."""
        result: AnalysisResult = self[site or next(iter(self))]
        return result.plot(**index)

    @property
    def meta(self) -> dict:
        return next(iter(self.values())).meta if self else {}
