"""A small timm VisionTransformer trained in the test session in seconds, on the simple shapes
of `tests/support/shapes.py` (cached). The attribution-patching tests measured their floors on
this model; the other trained-model tests use `builtin:shapes-vit` (tests/support/trained.py)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tests.support.shapes import SHAPES, make_shapes

MIN_ACCURACY = 0.8  # chance is 1 / len(SHAPES) = 0.25


class Trained(NamedTuple):
    model: nn.Module  # timm VisionTransformer in eval mode; class i is SHAPES[i]
    images: Tensor  # held-out [n, 3, 32, 32]
    labels: Tensor  # [n]
    masks: Tensor  # [n, 32, 32] bool
    accuracy: float  # on the held-out set


@functools.cache
def trained_shapes_vit(seed: int = 0, steps: int = 400, n_train: int = 3000, n_test: int = 256) -> Trained:
    """Train a 32px, patch-8, depth-2, width-48 ViT (CLS token) on `make_shapes`; returns it with
    held-out data and accuracy (>= MIN_ACCURACY, asserted). Seeded; the global RNG is left as it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and far faster on a busy machine
    try:
        with torch.random.fork_rng(devices=[]):
            return _train(seed, steps, n_train, n_test)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int, steps: int, n_train: int, n_test: int) -> Trained:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=48, depth=2, num_heads=3, num_classes=len(SHAPES))
    x, y, _ = make_shapes(n_train, seed=seed + 100)
    test_x, test_y, test_m = make_shapes(n_test, seed=seed + 200)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n_train, (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(-1) == test_y).float().mean().item()
    assert accuracy >= MIN_ACCURACY, f"shapes ViT reached only {accuracy:.2f} held-out accuracy"
    return Trained(model, test_x, test_y, test_m, accuracy)
