"""Patching on a GPU gives the CPU's numbers: every site, both directions, attribution patching
(steps 1 and 2), on a small random timm ViT with registers. Prints the largest differences and
exits non-zero if one is over 1e-4 (float32; TF32 off).

    python bench/device_check_patching.py [--device cuda]
"""

from __future__ import annotations

import argparse
import sys

import torch

import prisma_ext as px
from prisma_ext.analysis.patching import activation_patching, attribution_patching
from prisma_ext.analysis.targets import LogitDiff

SITES = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z")


def sweeps(src, device: torch.device, clean, corrupted) -> dict[str, torch.Tensor]:
    model = px.load(src, device=device)
    clean, corrupted = clean.to(device), corrupted.to(device)
    metric = LogitDiff(torch.tensor([0, 1]), torch.tensor([2, 3]))
    out = {}
    for direction in ("denoising", "noising"):
        exact = activation_patching(model, clean, corrupted, metric, sites=SITES, direction=direction,
                                    batch_size=16, progress=False)
        out.update({f"{direction} {site}": r.values for site, r in exact.items()})
    for steps in (1, 2):
        approx = attribution_patching(model, clean, corrupted, metric, sites=SITES, steps=steps)
        out.update({f"attribution steps={steps} {site}": r.values for site, r in approx.items()})
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    device = torch.device(parser.parse_args().device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import timm

    torch.manual_seed(0)
    src = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=42, depth=3,
                            embed_dim=96, num_heads=4, num_classes=7).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    clean, corrupted = torch.randn(2, 3, 42, 42), torch.randn(2, 3, 42, 42)
    on_cpu = sweeps(src, torch.device("cpu"), clean, corrupted)
    on_device = sweeps(src, device, clean, corrupted)
    worst = 0.0
    for key, want in on_cpu.items():
        diff = (on_device[key].cpu() - want).abs().max().item()
        worst = max(worst, diff)
        print(f"{key:32s} max |{device.type} - cpu| {diff:.1e}")
    print(f"worst {worst:.1e}: {'ok' if worst <= 1e-4 else 'FAILED'}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
