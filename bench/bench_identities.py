"""The cost of the identity checks every method runs (the lens's last layer against the output,
DLA's sum against the score, patching every token against the source run), side by side in one
run: each call timed with its check and with the check switched off, interleaved.

    .venv/bin/python bench/bench_identities.py [--model vit_small_patch16_224] [--rounds 5]

Target: each check under 2% of its method's time.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import prisma_ext as px
from prisma_ext.analysis import attribution, lens
from prisma_ext.analysis.patching import activation

CHECKS = {"logit_lens": (lens, "check_last_layer"), "direct_logit_attribution": (attribution, "check_sum"),
          "activation_patching": (activation, "check_everything_patched")}


@contextlib.contextmanager
def timed(method: str, spent: list[float]):
    """The check, timed on its own (its seconds appended to `spent`)."""
    module, name = CHECKS[method]
    kept = getattr(module, name)

    def check(*a, **k):
        start = time.perf_counter()
        try:
            return kept(*a, **k)
        finally:
            spent.append(time.perf_counter() - start)

    setattr(module, name, check)
    try:
        yield
    finally:
        setattr(module, name, kept)


@contextlib.contextmanager
def without(method: str):
    module, name = CHECKS[method]
    kept = getattr(module, name)
    setattr(module, name, lambda *a, **k: None)
    try:
        yield
    finally:
        setattr(module, name, kept)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = px.load(f"timm:{args.model}", pretrained=False)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, *model.cfg.img_size, generator=gen)
    clean, corrupted = images[:1], images[1:2]
    whole = {"all tokens": list(range(model.layout.n_tokens))}
    calls = {
        "logit_lens (batch 4)": ("logit_lens", lambda: px.logit_lens(model, images)),
        "direct_logit_attribution by source (batch 4)": (
            "direct_logit_attribution",
            lambda: px.direct_logit_attribution(model, images, by=("layer", "head", "source"))),
        "activation_patching resid_pre, every layer x rows": ("activation_patching", lambda: px.activation_patching(
            model, clean, corrupted, px.LogitDiff(3, 7), sites="resid_pre", positions="rows", progress=False)),
        "activation_patching attn_out, mlp_out, z, all tokens": ("activation_patching", lambda: px.activation_patching(
            model, clean, corrupted, px.LogitDiff(3, 7), sites=("attn_out", "mlp_out", "z"), positions=whole,
            progress=False)),
    }
    print(f"{args.model}, random weights, {args.threads} threads, medians of {args.rounds} interleaved rounds")
    for label, (method, call) in calls.items():
        call()  # warm up
        on, off, spent = [], [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            with timed(method, spent):
                call()
            on.append(time.perf_counter() - start)
            with without(method):
                start = time.perf_counter()
                call()
                off.append(time.perf_counter() - start)
        a, b, c = statistics.median(on), statistics.median(off), statistics.median(spent)
        print(f"{label:<52} {b:6.3f} s without the check, {a:6.3f} s with it; the check itself {1e3 * c:7.2f} ms "
              f"= {c / a:.2%} of the call (target < 2%)")


if __name__ == "__main__":
    main()
