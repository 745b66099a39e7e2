"""The cost of px.load's check against the source (verify=True), side by side in one run.

    .venv/bin/python bench/bench_verify.py [--model vit_base_patch16_224] [--rounds 3]

Prints, for a random-weight timm model: px.load with and without the check (TL and nnsight), the
check alone, and one source forward + one hooked forward at batch 2 (the check's target: at most
that, and under 10% of px.load).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import prisma_ext as px
from prisma_ext.verification import probe_images, verify_hooked, verify_traced


def seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import timm

    src = timm.create_model(args.model, pretrained=False).eval()
    adapter = px.adapters.adapter_for(src)
    hooked = px.load(src, verify=False)
    traced = px.load(src, backend="nnsight", verify=False)
    images = probe_images(hooked.cfg, "cpu", torch.float32)

    def forwards():
        with torch.no_grad():
            src(images)
            hooked(images)

    import os
    import tempfile

    from safetensors.torch import save_file

    folder = tempfile.mkdtemp()
    checkpoint = os.path.join(folder, "weights.safetensors")  # a pretrained checkpoint, as timm reads one
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, checkpoint)
    r = args.rounds
    named_off = seconds(lambda: px.load(f"timm:{args.model}", pretrained=checkpoint, verify=False), r)
    named_on = seconds(lambda: px.load(f"timm:{args.model}", pretrained=checkpoint), r)
    load_off = seconds(lambda: px.load(src, verify=False), r)
    load_on = seconds(lambda: px.load(src), r)
    check = seconds(lambda: verify_hooked(adapter, src, hooked, args.model), r)
    both = seconds(forwards, r)
    traced_off = seconds(lambda: px.load(src, backend="nnsight", verify=False), r)
    traced_on = seconds(lambda: px.load(src, backend="nnsight"), r)
    traced_check = seconds(lambda: verify_traced(adapter, src, traced, args.model), r)
    print(f"{args.model}, random weights, batch-2 probe, {args.threads} threads, medians of {r}")
    print(f"TL:      px.load {load_off:.2f} s without the check, {load_on:.2f} s with it; the check {check:.2f} s")
    print(f"         one source + one hooked forward at batch 2: {both:.2f} s; check / that = {check / both:.2f}x "
          f"(target <= 1); check / px.load with it = {check / load_on:.1%} (target < 10%)")
    print(f"named:   px.load('timm:{args.model}', pretrained=<local checkpoint>) {named_off:.2f} s without the check, "
          f"{named_on:.2f} s with it: the check is {(named_on - named_off) / named_on:.1%} of it (target < 10%)")
    print(f"nnsight: px.load {traced_off:.2f} s without the check, {traced_on:.2f} s with it; the check "
          f"{traced_check:.2f} s (it converts the weights once and reads every site in one trace)")


if __name__ == "__main__":
    main()
