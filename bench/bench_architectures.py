"""The hooked forward of today's architectures against timm's own forward, side by side in one run.

    .venv/bin/python bench/bench_architectures.py [--device cuda] [--rounds 15]

Rotary models (EVA-02 small: interleaved RoPE + packed SwiGLU; DINOv3 small: half-layout RoPE,
registers, layer scale; timm's RoPE ViT-B: AttentionRope) and gated-MLP ViTs (a ViT-S with
SwiGLU, one with the packed GLU), batch 8 at each model's own size, float32, every parameter
randomised. Each pair is checked to agree first (px.load's tolerance), then timed interleaved
round by round (the order rotates, so drift in the machine's speed hits both alike).
Targets: rotary <= 1.10 x timm, gated MLP <= 1.05 x timm.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import timm
import torch
from bench_analysis import interleaved

import prisma_ext as px
from prisma_ext.verification import tolerance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.models import randomize_  # noqa: E402  every parameter random, so the check means something

BATCH = 8
THREADS = 2
TARGETS = {"rotary": 1.10, "gated MLP": 1.05}


def models() -> dict[str, tuple[str, torch.nn.Module]]:
    from timm.layers import GluMlp, SwiGLU
    from timm.models.vision_transformer import VisionTransformer

    vit_s = dict(embed_dim=384, depth=12, num_heads=6)
    return {
        "eva02_small_patch14_224": ("rotary", timm.create_model("eva02_small_patch14_224")),
        "vit_small_patch16_dinov3": ("rotary", timm.create_model("vit_small_patch16_dinov3")),
        "vit_base_patch16_rope_224": ("rotary", timm.create_model("vit_base_patch16_rope_224")),
        "ViT-S/16 + SwiGLU": ("gated MLP", VisionTransformer(**vit_s, mlp_layer=SwiGLU, act_layer="silu")),
        "ViT-S/16 + packed GLU": ("gated MLP", VisionTransformer(**vit_s, mlp_layer=GluMlp, act_layer="silu",
                                                                 mlp_ratio=8 / 3)),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.device}, threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}; batch {BATCH}, float32, {args.rounds} interleaved rounds")
    ok = True
    for name, (kind, source) in models().items():
        source = randomize_(source.eval(), seed=1).to(args.device)
        hooked = px.load(source)
        x = torch.randn(BATCH, 3, *hooked.cfg.img_size, device=args.device)
        with torch.inference_mode():
            want = source(x)
            err = (hooked(x) - want).abs().max().item()
            if not err <= tolerance(want):  # px.load's own rule: 1e-4 + 1e-4 * max |output|
                print(f"{name}: FAIL, max |hooked - timm| = {err:.2e}; not timing")
                return 1
            sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
            med = interleaved({"timm": lambda s=source, x=x, sync=sync: (s(x), sync()),
                               "hooked": lambda h=hooked, x=x, sync=sync: (h(x), sync())}, args.rounds, warmup=3)
        ratio = med["hooked"] / med["timm"]
        verdict = "ok" if ratio <= TARGETS[kind] else "OVER TARGET"
        ok &= ratio <= TARGETS[kind]
        print(f"{name:<26} {kind:<9} timm {med['timm'] * 1e3:7.1f} ms  hooked {med['hooked'] * 1e3:7.1f} ms  "
              f"{ratio:5.3f}x (target <= {TARGETS[kind]:.2f}) {verdict}   |diff| {err:.1e}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
