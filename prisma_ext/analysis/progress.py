"""Progress bars of the analysis methods: tqdm on stderr, with a rate and an ETA."""

from __future__ import annotations


class Progress:
    """A tqdm bar on stderr (rate and ETA) when asked, else a no-op."""

    def __init__(self, total: int, enabled: bool, desc: str, unit: str = "run"):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

    def __enter__(self) -> Progress:
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
