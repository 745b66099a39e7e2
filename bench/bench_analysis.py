"""The analysis layer's cost, as ratios measured side by side in one run.

    .venv/bin/python bench/bench_analysis.py [--rounds 7] [--compare-batch 2] [--skip-compare]

ViT-S/16 at 224 with random weights, float32, 2 CPU threads.
1. `direct_logit_attribution` by layer, head and source for a batch of 8, against one forward
   pass of the same model (the TL backend's HookedViT, and the nnsight backend against its timm
   module). Calls are interleaved round by round so drift in the machine's speed hits all
   alike; medians are printed. Target: <= 3x one forward pass. The sum identity is checked first.
2. `compare_attributions` over every method (ours and Captum's) on a small batch: each
   method's seconds next to Captum's IntegratedGradients (n_steps=50) from the same run, and
   the deletion / insertion AUCs.
"""

from __future__ import annotations

import argparse
import platform
import time

import timm
import torch
from timing import interleaved

import prisma_ext as px

MODEL = "vit_small_patch16_224"
BATCH = 8
THREADS = 2
TARGET = 3.0


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_dla(rounds: int) -> None:
    src = timm.create_model(MODEL, pretrained=False).eval()
    tl = px.load(src)
    nn_model = px.load(src, backend="nnsight")
    images = torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = src(images)
    classes = logits.argmax(-1)
    dla = px.direct_logit_attribution(tl, images, classes)
    error = (dla.values.sum(-1) - logits[torch.arange(BATCH), classes]).abs().max().item()
    print(f"sum identity: max |sum of components - logit| = {error:.2e} ({dla.values.shape[1]} components, "
          f"source part {tuple(dla.part('source').shape)})")

    def forward(model):
        with torch.no_grad():
            model(images)

    calls = {
        "timm forward": lambda: forward(src),
        "HookedViT forward": lambda: forward(tl),
        "DLA layer+head+source (TL)": lambda: px.direct_logit_attribution(tl, images, classes),
        "DLA layer+head+source (nnsight)": lambda: px.direct_logit_attribution(nn_model, images, classes),
        "DLA layer only (TL)": lambda: px.direct_logit_attribution(tl, images, classes, by="layer"),
    }
    med = interleaved(calls, rounds, warmup=1)
    print(f"\n{MODEL}, batch {BATCH}, medians of {rounds} interleaved rounds")
    base = {"(TL)": med["HookedViT forward"], "(nnsight)": med["timm forward"]}
    for name, seconds in med.items():
        ref = next((v for k, v in base.items() if name.endswith(k)), None)
        ratio = f"{seconds / ref:5.2f}x its backend's forward" if ref else ""
        print(f"  {name:34s} {seconds * 1000:8.1f} ms  {ratio}")
    worst = max(med["DLA layer+head+source (TL)"] / med["HookedViT forward"],
                med["DLA layer+head+source (nnsight)"] / med["timm forward"])
    print(f"DLA by layer, head and source: worst ratio {worst:.2f}x (target <= {TARGET}x): "
          f"{'PASS' if worst <= TARGET else 'FAIL'}")


def bench_compare(batch: int) -> None:
    src = timm.create_model(MODEL, pretrained=False).eval()
    model = px.load(src)
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    table = px.compare_attributions(model, images).to_dataframe()
    total = time.perf_counter() - start
    ig = table.loc[table["method"] == "integrated_gradients", "seconds"].item()
    table["x IG(50)"] = table["seconds"] / ig
    print(f"\ncompare_attributions on {MODEL}, batch {batch} (predicted class; IG n_steps=50 is Captum's "
          f"IntegratedGradients from this run); {total:.1f} s in all with the faithfulness runs")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("(random weights over 1000 classes: probabilities, hence AUCs, are all near 1/1000; the seconds "
          "are the point here)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compare-batch", type=int, default=2)
    parser.add_argument("--skip-compare", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {THREADS} threads")
    bench_dla(args.rounds)
    if not args.skip_compare:
        bench_compare(args.compare_batch)


if __name__ == "__main__":
    main()
