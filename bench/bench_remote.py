"""Each analysis method on a remote model: round trips, bytes sent and returned, the share of the
weights downloaded, and time against the same method on a local trace, side by side in one run.

    .venv/bin/python bench/bench_remote.py [--rounds 2] [--batch 2] [--threads 2]

A Hugging Face ViT-S/16 at 224 (ViTForImageClassification, random weights, 1000 classes) saved to
a temporary folder and loaded with `remote=True`: the client holds its skeleton on the meta
device. Every request runs on an in-process server without prisma-ext (`tests.support.hidden`:
nnsight's class built from the client's key, prisma_ext hidden while the request is deserialised
and run), so "sent" is the request nnsight serialises (body, envoy, inputs) and "returned" the
tensors the body saved. Time is the whole call, serialising included, with no network: on NDIF
add each round trip's latency and the transfer. Each method's result is checked equal to the
local trace's (largest difference shown). The patching sweep (resid_pre at all 12 layers, 14
position rows) must take at most ceil(runs / chunk) + 3 round trips (issue 14).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support

from timing import bench_args  # noqa: E402
from vit_methods import vit_methods  # noqa: E402

import prisma_ext as px  # noqa: E402
from prisma_ext.analysis.backend import Backend  # noqa: E402
from tests.support.hidden import HiddenServer, prisma_ext_hidden  # noqa: E402

NAMES = ("raw", "acts", "grads", "params", "out")


def build(folder: str):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=224, patch_size=16, num_labels=1000)
    torch.manual_seed(0)
    src = ViTForImageClassification(config).eval()
    src.save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return src


def values(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if hasattr(result, "results"):
        return [result[k].values for k in result]
    return [result.values]


def main() -> int:
    from nnsight.modeling.mixins.remotable import Remotable

    from prisma_ext.traced.remote import model_key

    args = bench_args(rounds=2)
    folder = tempfile.mkdtemp(prefix="bench_remote_")
    src = build(folder)
    client = px.load(f"hf:{folder}", backend="nnsight", remote=True)
    with prisma_ext_hidden():
        server = Remotable.from_model_key(model_key(client, allow_folder=True), dispatch=True)
    workers: list[HiddenServer] = []
    trace = type(client).trace

    def on_the_server(model, *a, **k):
        workers.append(HiddenServer(server, NAMES))
        return trace(model, *a, backend=workers[-1], **k)

    type(client).trace = on_the_server
    local = px.load(src, backend="nnsight")
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(args.batch, 3, 224, 224, generator=gen)
    corrupted = torch.randn(args.batch, 3, 224, 224, generator=gen)

    start = len(workers)
    Backend.of(client)  # the readout and W_O / b_O, saved from the model once
    fetch = workers[start:]
    total = sum(p.numel() * p.element_size() for p in src.parameters())
    got = sum(w.returned for w in fetch)
    print(f"HF ViT-S/16 (random weights), batch {args.batch}, {args.threads} threads, in-process server")
    print(f"weights: {len(fetch)} trip, {got / 1e6:.2f} MB of {total / 1e6:.1f} MB downloaded "
          f"({100 * got / total:.1f}%: the readout and each layer's W_O / b_O)")
    methods = vit_methods(clean, corrupted)
    print(f"{'method':56s} {'trips':>5s} {'sent MB':>8s} {'back MB':>8s} {'remote s':>9s} {'local s':>8s} "
          f"{'ratio':>6s} {'max diff':>9s}")
    ok = True
    for name, run in methods.items():
        grad = "gradient" in name or "attribution_patching" in name
        remote_s, local_s = [], []
        for _ in range(args.rounds):
            with torch.enable_grad() if grad else torch.no_grad():
                before = len(workers)
                t0 = time.perf_counter()
                result = run(client)
                remote_s.append(time.perf_counter() - t0)
                trips = workers[before:]
                t0 = time.perf_counter()
                want = run(local)
                local_s.append(time.perf_counter() - t0)
        diff = max(float((a - b).abs().max()) for a, b in zip(values(result), values(want)))
        sent, back = sum(w.payload for w in trips) / 1e6, sum(w.returned for w in trips) / 1e6
        r, lo = min(remote_s), min(local_s)
        note = ""
        if name.startswith("activation_patching"):
            runs = 12 * 14 * args.batch
            chunk = _chunk(local, clean)
            bound = math.ceil(runs / chunk) + 3
            ok = ok and len(trips) <= bound
            note = f"  (<= ceil({runs} / {chunk}) + 3 = {bound}: {'met' if len(trips) <= bound else 'NOT met'})"
        print(f"{name:56s} {len(trips):5d} {sent:8.2f} {back:8.2f} {r:9.3f} {lo:8.3f} {r / lo:5.2f}x {diff:9.1e}{note}")
        ok = ok and diff <= 1e-5
    print("every result equals the local trace's within 1e-5" if ok else "A RESULT OR THE TRIP BOUND MISSED")
    return 0 if ok else 1


def _chunk(model, clean) -> int:
    from prisma_ext.analysis.patching.plan import make_plan

    return make_plan(model, clean, clean, ("resid_pre",), "rows", "all", None, "denoising", None).chunk_size()


if __name__ == "__main__":
    raise SystemExit(main())
