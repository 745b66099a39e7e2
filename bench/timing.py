"""Side-by-side timing for the bench scripts (run as `python bench/NAME.py`, so this imports as
`timing`)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable


def bench_args(rounds: int) -> argparse.Namespace:
    """The benches' common options (--rounds, --batch, --threads), parsed; torch set to the
    threads asked for."""
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 0) -> dict[str, float]:
    """Median seconds of each call, run round by round in a rotating order (after `warmup`
    untimed rounds), so that the machine's drifts fall on every call alike."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
