"""What prisma-ext's Captum wrapper costs over Captum called directly on the same hooked model.

    .venv/bin/python bench/bench_captum.py [--model vit_tiny_patch16_224] [--images 8] [--steps 50] [--rounds 3]

IntegratedGradients (zero baseline, `--steps` steps) on `--images` images of a random-weight
timm ViT converted to a HookedViT: `px.captum_attribution(model, images, target,
method="integrated_gradients")` against `captum.attr.IntegratedGradients(lambda x:
model(x)).attribute(images, target=..., internal_batch_size=B)` with the same B as the
wrapper's default, run alternately round by round (medians). The attributions are compared
first (they must agree), so the two calls do the same work. Target: wrapper / direct <= 1.10.
Also prints Captum direct with no `internal_batch_size` (every step in one batch), the setting
the issue measured against.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import prisma_ext as px

TARGET = 1.10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import captum.attr as ca

    from prisma_ext.analysis.captum_attr import default_internal_batch

    model = px.load(f"timm:{args.model}", pretrained=False).eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, *model.cfg.img_size, generator=gen)
    with torch.no_grad():
        target = model(images).argmax(-1)
    batch = default_internal_batch(args.images)

    def wrapper():
        return px.captum_attribution(model, images, target, method="integrated_gradients", n_steps=args.steps)

    def direct(internal: int | None = batch):
        ig = ca.IntegratedGradients(lambda x: model(x))
        return ig.attribute(images.clone().requires_grad_(True), baselines=torch.zeros_like(images),
                            target=target, n_steps=args.steps, internal_batch_size=internal)

    ours, theirs = wrapper(), direct()
    patch = model.cfg.patch_size
    from prisma_ext.analysis.captum_attr import to_patches

    err = float((ours.values - to_patches(theirs.detach(), patch, "sum")).abs().max())
    scale = float(ours.values.abs().max())
    assert err <= 1e-4 * max(1.0, scale), f"the two calls disagree: max error {err:.3g}"
    times: dict[str, list[float]] = {"wrapper": [], "direct": []}
    for _ in range(args.rounds):
        for name, fn in (("wrapper", wrapper), ("direct", direct)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    start = time.perf_counter()
    direct(None)
    one_batch = time.perf_counter() - start
    ratio = med["wrapper"] / med["direct"]
    print(f"{args.model}, {args.images} images, IG {args.steps} steps, internal_batch_size {batch}, "
          f"{args.threads} threads, {args.rounds} rounds (medians); attributions agree to {err:.2g}")
    print(f"  prisma-ext captum_attribution: {med['wrapper']:.2f} s")
    print(f"  Captum direct, same batch:     {med['direct']:.2f} s")
    print(f"  Captum direct, one batch:      {one_batch:.2f} s (once)")
    print(f"  wrapper / direct: {ratio:.3f}x (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
