"""The nnsight backend against its timm module: a plain forward and traces that read sites.

    .venv/bin/python bench/bench_traced.py

ViT-S/16 at 224 with random weights, batch 8, float32, 2 CPU threads. Checks that the traced
output and the saved residual stream agree with timm's own forward first, then times four calls
interleaved round by round (A B C D, B C D A, ...), so that drift in the machine's speed hits
all alike, and prints medians and the ratios to the plain forward. Plain torch hooks keeping
the same 12 tensors show what keeping activations alive costs apart from nnsight.
Target: a trace saving `blocks.{i}.hook_resid_post` at every layer <= 1.2 x the plain forward.
"""

from __future__ import annotations

import platform
import statistics
import time

import timm
import torch
from nnsight import save

import prisma_ext as px

MODEL = "vit_small_patch16_224"
BATCH = 8
THREADS = 2
WARMUP = 3
ROUNDS = 20
ATOL = 1e-5
TARGET = 1.2


def plain(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def hooks_resid(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The same residual streams kept by plain torch forward hooks: what keeping 12 activations
    alive costs without nnsight."""
    kept: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, i, o: kept.append(o)) for b in module.blocks]
    try:
        return module(x), kept
    finally:
        for h in handles:
            h.remove()


def trace_output(model, x: torch.Tensor) -> torch.Tensor:
    with model.trace(x):
        out = model.output.save()
    return out


def trace_resid(model, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    names = [f"blocks.{i}.hook_resid_post" for i in range(len(model.blocks))]
    with model.trace(x):
        resid = save([model.site(name) for name in names])
        out = model.output.save()
    return out, resid


def check(module: torch.nn.Module, model, x: torch.Tensor) -> float:
    """Largest difference between the traced values and timm's own (forward hooks)."""
    ref, ref_resid = hooks_resid(module, x)
    out, resid = trace_resid(model, x)
    assert len(resid) == len(ref_resid) == len(module.blocks)
    return max([(out - ref).abs().max().item()] +
               [(a - b).abs().max().item() for a, b in zip(resid, ref_resid)])


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    module = timm.create_model(MODEL, pretrained=False).eval()
    model = px.load(module, backend="nnsight")
    x = torch.randn(BATCH, 3, 224, 224)
    calls = {
        "timm forward": lambda: plain(module, x),
        "torch hooks, resid x12": lambda: hooks_resid(module, x),
        "trace, output only": lambda: trace_output(model, x),
        "trace, resid_post x12": lambda: trace_resid(model, x),
    }
    with torch.no_grad():
        err = check(module, model, x)
        for _ in range(WARMUP):
            for call in calls.values():
                call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        order = list(calls)
        for r in range(ROUNDS):
            for name in order[r % len(order):] + order[: r % len(order)]:
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)

    print(f"{MODEL}, batch {BATCH}, float32, {THREADS} threads, {platform.processor() or 'cpu'}; "
          f"torch {torch.__version__}, timm {timm.__version__}; {ROUNDS} rounds interleaved")
    print(f"max |traced - timm| over the output and 12 residual streams: {err:.2e} (atol {ATOL})")
    base = statistics.median(times["timm forward"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:24s} median {med * 1e3:8.1f} ms  (min {min(ts) * 1e3:7.1f})  "
              f"ratio {med / base:5.3f}")
    ratio = statistics.median(times["trace, resid_post x12"]) / base
    vs_hooks = statistics.median(times["trace, resid_post x12"]) / statistics.median(
        times["torch hooks, resid x12"])
    print(f"trace saving resid_post / torch hooks keeping the same tensors = {vs_hooks:.3f} "
          "(nnsight's own share of the cost)")
    ok = ratio <= TARGET and err <= ATOL
    print(f"trace saving resid_post at every layer / timm forward = {ratio:.3f} "
          f"(target <= {TARGET}): {'OK' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
