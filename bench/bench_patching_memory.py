"""Activation patching memory: the peak memory of a ViT-B sweep with the default `batch_size`.

vit_base_patch16_224, random weights, one image pair, sites resid_pre and z (per head, the
largest number of runs per layer) at the last layer, every position. On a CPU this process's resident
memory is read before the sweep and at its peak during it; on a GPU the peak allocated memory.

    .venv/bin/python bench/bench_patching_memory.py [--device cuda] [--batch-size N]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import prisma_ext as px
from prisma_ext.analysis.patching import activation_patching
from prisma_ext.analysis.patching.plan import default_batch_size
from prisma_ext.analysis.targets import LogitDiff


def rss_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in GiB (Linux)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib / 2**20


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="runs per chunk (default: the library's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    import timm

    model = px.load(timm.create_model("vit_base_patch16_224", pretrained=False).eval(), device=device)
    gc.collect()
    clean, corrupted = (torch.randn(1, 3, 224, 224, device=device) for _ in range(2))
    cfg = model.cfg
    size = args.batch_size or default_batch_size(model.layout.n_tokens, cfg.d_model, cfg.d_mlp, cfg.n_heads, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**30
    else:
        reset_peak_rss()
        before = rss_gb("VmRSS")
    t0 = time.perf_counter()
    result = activation_patching(model, clean, corrupted, LogitDiff(3, 7), sites=("resid_pre", "z"), layers=[11],
                                 batch_size=size, progress=False)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else rss_gb("VmHWM")
    runs = sum(r.values[0].numel() for r in result.values())
    what = "allocated on the GPU" if cuda else "resident (whole process)"
    print(f"vit_base_patch16_224 on {device.type}, {runs} patched runs, {size} runs a chunk, {seconds:.1f} s")
    print(f"memory {what}: {before:.2f} GB before the sweep (weights, libraries), peak {peak:.2f} GB")


if __name__ == "__main__":
    main()
