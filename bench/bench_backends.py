"""Each analysis method on the nnsight backend against the same method on the TL backend, side by
side in one run, with the number of traces (round trips, were the model remote) each call opens.

    .venv/bin/python bench/bench_backends.py [--rounds 5] [--batch 2] [--threads 2]

ViT-S/16 at 224 with random weights (timm, no download), float32. For each method: the median
seconds on a HookedViT and on the traced timm module (interleaved round by round), their ratio
(target <= 1.3x, issue 14), and how many nnsight traces one call opened. The activation-patching
sweep (resid_pre at all 12 layers, patch rows as position groups) must open at most
ceil(runs / chunk) traces for its patched runs (chunks span layers), plus three fixed ones: the
clean and corrupted runs and the sweep's identity check (every token patched).
"""

from __future__ import annotations

import math

import timm
import torch
from timing import bench_args, interleaved
from vit_methods import vit_methods

import prisma_ext as px
from prisma_ext.analysis.backend import Backend

MODEL = "vit_small_patch16_224"
RATIO_TARGET = 1.3


class TraceCounter:
    """Counts the traces a traced model opens (wraps its `trace` on the instance)."""

    def __init__(self, model):
        self.model, self.n = model, 0
        inner = model.trace

        def counted(*args, **kwargs):
            self.n += 1
            return inner(*args, **kwargs)
        model.__dict__["trace"] = counted

    def count(self, fn) -> int:
        self.n = 0
        fn()
        return self.n


def main() -> int:
    args = bench_args(rounds=5)
    src = timm.create_model(MODEL, pretrained=False).eval()
    tl, traced = px.load(src), px.load(src, backend="nnsight")
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(args.batch, 3, 224, 224, generator=gen)
    corrupted = torch.randn(args.batch, 3, 224, 224, generator=gen)
    methods = vit_methods(clean, corrupted)
    counter = TraceCounter(traced)
    Backend.of(traced)  # the weights copy is built once per model, not per call
    print(f"{MODEL} (random weights), batch {args.batch}, {args.threads} threads, median of {args.rounds} rounds")
    print(f"{'method':56s} {'TL s':>7s} {'nnsight s':>10s} {'ratio':>6s} {'traces':>7s}")
    worst = 0.0
    ok_traces = True
    for name, run in methods.items():
        with torch.no_grad() if "gradient" not in name and "attribution_patching" not in name else _null():
            times = interleaved({"tl": lambda run=run: run(tl), "nnsight": lambda run=run: run(traced)},
                                args.rounds, warmup=1)
        traces = counter.count(lambda run=run: run(traced))
        ratio = times["nnsight"] / times["tl"]
        worst = max(worst, ratio)
        note = ""
        if name.startswith("activation_patching"):
            runs = 12 * 14 * args.batch
            chunk = _chunk(traced, clean)
            bound = math.ceil(runs / chunk) + 3
            ok_traces = traces <= bound
            note = f"  (<= ceil({runs} runs / chunk {chunk}) + 3 = {bound}: {'met' if ok_traces else 'NOT met'})"
        print(f"{name:56s} {times['tl']:7.3f} {times['nnsight']:10.3f} {ratio:5.2f}x {traces:7d}{note}")
    print(f"worst ratio {worst:.2f}x (target <= {RATIO_TARGET}x: {'met' if worst <= RATIO_TARGET else 'NOT met'})")
    return 0 if worst <= RATIO_TARGET and ok_traces else 1


def _chunk(traced, clean) -> int:
    """The patched rows per forward pass the plan picks for this model and batch."""
    from prisma_ext.analysis.patching.plan import make_plan

    plan = make_plan(traced, clean, clean, ("resid_pre",), "rows", "all", None, "denoising", None)
    return plan.chunk_size()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
