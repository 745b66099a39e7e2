"""HookedViT against its timm source: forward, forward with no hooks, and a residual cache.

    .venv/bin/python bench/bench_hooked_vit.py

ViT-S/16 at 224 with random weights, batch 8, float32, 2 CPU threads. Checks the logits agree
first, then times the three calls interleaved round by round (A B C, B C A, C A B, ...), so
that drift in the machine's speed hits all three alike, and prints medians and the ratios to
timm.
Targets: HookedViT with no hooks <= 1.05 x timm, caching every resid_pre/post <= 1.15 x timm.
"""

from __future__ import annotations

import platform
import statistics
import time

import timm
import torch

import prisma_ext as px

MODEL = "vit_small_patch16_224"
BATCH = 8
THREADS = 2
WARMUP = 5
ROUNDS = 15
ATOL = 1e-4
TARGETS = {"hooked/timm": 1.05, "cache/timm": 1.15}


def resid_filter(name: str) -> bool:
    return name.endswith(("hook_resid_post", "hook_resid_pre"))


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)

    timm_model = timm.create_model(MODEL, pretrained=False).eval()
    hooked = px.load(timm_model, backend="tl").eval()
    x = torch.randn(BATCH, 3, 224, 224)

    with torch.inference_mode():
        ref = timm_model(x)
        out = hooked(x)
        logits, cache = hooked.run_with_cache(x, names_filter=resid_filter)
    err = max((out - ref).abs().max().item(), (logits - ref).abs().max().item())
    n_cached = len(cache)
    spread = ref.std().item()  # a zero head would make the agreement check vacuous
    print(f"{MODEL}, batch {BATCH}, float32, random weights")
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, "
        f"python {platform.python_version()}, {platform.machine()}"
    )
    print(
        f"max |logits - timm| = {err:.2e} (tolerance {ATOL:g}), logit std {spread:.3f}; "
        f"cached sites: {n_cached}"
    )
    if err > ATOL or not spread > 0:
        print("FAIL: HookedViT does not reproduce timm (or the logits are constant); not timing")
        return 1

    calls = {
        "timm": lambda: timm_model(x),
        "hooked": lambda: hooked(x),
        "cache": lambda: hooked.run_with_cache(x, names_filter=resid_filter),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        names = list(calls)
        for round_ in range(WARMUP + ROUNDS):
            # Rotate the order each round so that no call always runs first (or after another).
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                call = calls[name]
                t0 = time.perf_counter()
                call()
                dt = time.perf_counter() - t0
                if round_ >= WARMUP:
                    times[name].append(dt)

    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(f"\nmedian of {ROUNDS} interleaved rounds after {WARMUP} warm-up rounds:")
    for name, ms in med.items():
        lo, hi = min(times[name]) * 1e3, max(times[name]) * 1e3
        print(f"  {name:<7} {ms:8.1f} ms   (min {lo:.1f}, max {hi:.1f})")

    ratios = {"hooked/timm": med["hooked"] / med["timm"], "cache/timm": med["cache"] / med["timm"]}
    print()
    ok = True
    for name, ratio in ratios.items():
        target = TARGETS[name]
        verdict = "ok" if ratio <= target else "OVER TARGET"
        ok &= ratio <= target
        print(f"  {name:<12} {ratio:5.3f}   target <= {target:.2f}   {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
