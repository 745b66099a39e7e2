"""Activation patching speed: the batched sweep against the naive loop, measured in one run.

resid_pre over all layers x all positions on vit_small_patch16_224 (12 x 197 patched runs, batch of
one image pair), random weights, CPU float32. The naive loop is what TransformerLens's patching
helpers do: one full hooked forward pass per (layer, position). Both give the same numbers (checked
here). Then attribution patching of all four sites against one forward plus one backward pass
(and with steps=4, for information).

    .venv/bin/python bench/bench_patching.py [--layers N] [--device cuda] [--threads N]
        --layers N:  only the first N layers in both sweeps (shorter; default all 12)
        --device:    where to run (default cpu; on a GPU the timers synchronise)
        --threads N: CPU threads (default 2)
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import prisma_ext as px
from prisma_ext.analysis.patching import activation_patching, attribution_patching


def naive_resid_pre(model, clean, corrupted, metric, layers, n_tokens):
    values = torch.zeros(len(layers), n_tokens)
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    for li, layer in enumerate(layers):
        name = f"blocks.{layer}.hook_resid_pre"
        for pos in range(n_tokens):
            def patch(value, hook, pos=pos, name=name):
                value = value.clone()
                value[:, pos] = cache[name][:, pos]
                return value

            out = model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])
            values[li, pos] = out[0, 3] - out[0, 7]
    return values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=None, help="layers in both sweeps (default: all 12)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2: this project's CI machine)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    import timm

    src = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = px.load(src, device=device)
    clean, corrupted = torch.randn(1, 3, 224, 224, device=device), torch.randn(1, 3, 224, 224, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    metric = px.LogitDiff(3, 7)
    layers = list(range(args.layers or model.cfg.n_layers))
    n_tokens = model.layout.n_tokens
    print(f"vit_small_patch16_224, random weights, {len(layers)} layers x {n_tokens} positions, batch 1")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"torch {torch.__version__}, {where}, threads {torch.get_num_threads()}")

    with torch.no_grad():
        if device.type == "cuda":  # warm up kernels and the allocator for both ways
            naive_resid_pre(model, clean, corrupted, metric, layers[:1], 4)
            activation_patching(model, clean, corrupted, metric, sites="resid_pre", layers=layers[:1], progress=False)
        sync()
        t0 = time.perf_counter()
        batched = activation_patching(model, clean, corrupted, metric, sites="resid_pre", layers=layers,
                                      progress=False)["resid_pre"].values[0]
        sync()
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive = naive_resid_pre(model, clean, corrupted, metric, layers, n_tokens)
        sync()
        t_naive = time.perf_counter() - t0
    diff = (batched - naive).abs().max().item()
    print(f"naive loop   {t_naive:8.2f} s  ({len(layers) * n_tokens} forward passes)")
    print(f"batched      {t_batched:8.2f} s  (max |difference| {diff:.1e})")
    print(f"speed-up     {t_naive / t_batched:8.2f}x  target >= 5x  {'ok' if t_naive / t_batched >= 5 else 'MISSED'}")

    def forward_backward():
        out = model(corrupted)
        (out[:, 3] - out[:, 7]).sum().backward()
        model.zero_grad(set_to_none=True)
        sync()

    def attribution(steps: int = 1):
        attribution_patching(model, clean, corrupted, metric, steps=steps, progress=False)
        sync()

    runs = {"forward+backward": forward_backward, "attribution patching (4 sites)": attribution,
            "  the same, steps=4": lambda: attribution(4)}
    times = {name: [] for name in runs}
    for fn in runs.values():  # warm up
        fn()
    for _ in range(5):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:32s} {v * 1000:8.1f} ms (median of 5)")
    ratio = med["attribution patching (4 sites)"] / med["forward+backward"]
    print(f"attribution / (forward+backward) {ratio:.2f}x  target <= 3x  {'ok' if ratio <= 3 else 'MISSED'}")
    print(f"steps=4 / (forward+backward)     {med['  the same, steps=4'] / med['forward+backward']:.2f}x  (no target)")


if __name__ == "__main__":
    main()
