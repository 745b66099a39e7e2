"""What CLIP's text-based decomposition costs (issue 17's speed targets), side by side in one run.

    .venv/bin/python bench/bench_clip_decomposition.py [--model open_clip:ViT-B-16] [--rounds 3] [--texts 3000]

1. `px.clip_decomposition(clip, image)` of one image (every head x source token part, the
   default) against one `clip.encode_image(image)` of the same image, alternating round by round
   (medians). Target: decomposition / forward <= 3.
2. TextSpan over a bank of `--texts` text embeddings for every head of the tower (`span_basis`,
   k=5 texts per head, the heads' outputs over `--images` images), timed alone. Target: <= 10 s.
   The text embeddings are computed once beforehand and not timed (encoding 3,000 prompts
   through a ViT-B text tower is a separate cost, shown too): the target is the search itself.

3. `px.second_order_effects(clip, image, layer)` for every neuron of block 0 (the most later
   layers: the worst case) and of the last-but-one block, on one image, against one forward
   (medians, alternating). No target: the issue sets none; recorded in docs/benchmarks.md.

Random weights (no download); 2 CPU threads by default.
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import interleaved

import prisma_ext as px

DECOMPOSITION_TARGET = 3.0
SPAN_TARGET_S = 10.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="open_clip:ViT-B-16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--images", type=int, default=64, help="images whose head outputs TextSpan spans")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from prisma_ext.analysis.text_span import span_basis

    clip = px.load(args.model, pretrained=False)
    cfg = clip.visual.cfg
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, *cfg.img_size, generator=gen)
    with torch.no_grad():
        parts = px.clip_decomposition(clip, image)
        print(f"{args.model} (random weights), {args.threads} threads; decomposition of one image: "
              f"{tuple(parts.part('token').values.shape)} token parts, largest miss {parts.meta['max_error']:.2e}")
        times = interleaved({"decomposition": lambda: px.clip_decomposition(clip, image),
                             "forward": lambda: clip.encode_image(image)}, args.rounds)
    ratio = times["decomposition"] / times["forward"]
    ok = ratio <= DECOMPOSITION_TARGET
    print(f"1. decomposition {times['decomposition']:.3f} s, forward {times['forward']:.3f} s: {ratio:.2f}x "
          f"(target <= {DECOMPOSITION_TARGET}x: {'met' if ok else 'NOT met'})")

    images = torch.randn(args.images, 3, *cfg.img_size, generator=gen)
    with torch.no_grad():
        heads = px.clip_decomposition(clip, images, tokens=False).values  # [batch, layer, head, d_embed]
        prompts = [f"a photo of thing number {i}" for i in range(args.texts)]
        start = time.perf_counter()
        bank = torch.cat([clip.encode_text(prompts[i:i + 256]) for i in range(0, len(prompts), 256)])
        encode_s = time.perf_counter() - start
        bank = bank / bank.norm(dim=-1, keepdim=True)
        start = time.perf_counter()
        for layer in range(heads.shape[1]):
            for head in range(heads.shape[2]):
                span_basis(heads[:, layer, head].float(), bank, k=5)
        span_s = time.perf_counter() - start
    ok_span = span_s <= SPAN_TARGET_S
    n_heads = heads.shape[1] * heads.shape[2]
    print(f"2. TextSpan, {n_heads} heads x {args.texts} texts, k=5, over {args.images} images: {span_s:.2f} s "
          f"(target <= {SPAN_TARGET_S} s: {'met' if ok_span else 'NOT met'}); encoding the texts once: "
          f"{encode_s:.1f} s")

    n_layers = cfg.n_layers
    with torch.no_grad():
        times = interleaved({"block 0": lambda: px.second_order_effects(clip, image, 0),
                             f"block {n_layers - 2}": lambda: px.second_order_effects(clip, image, n_layers - 2),
                             "forward": lambda: clip.encode_image(image)}, args.rounds)
    shown = ", ".join(f"{name} {t:.3f} s ({t / times['forward']:.1f}x)" for name, t in times.items()
                      if name != "forward")
    print(f"3. second-order effects of all {cfg.d_mlp} neurons of one block, one image: {shown}; "
          f"forward {times['forward']:.3f} s (no target)")
    return 0 if ok and ok_span else 1


if __name__ == "__main__":
    raise SystemExit(main())
