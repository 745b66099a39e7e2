"""Do attribution maps land on the object? Pointing game and deletion AUC per method, ours and
Captum's, on the built-in shapes classifier and held-out scenes (the object's mask is known).

Pointing game: the share of images whose top-scoring patch overlaps the object's mask.
Mask share: the share of positive attribution that falls on patches overlapping the mask.
Deletion / insertion AUC: from `compare_attributions` (mean over images; baseline "mean").

    .venv/bin/python bench/pointing_game.py [--n 32] [--seed 123]
"""

from __future__ import annotations

import argparse

import torch

import prisma_ext as px
from prisma_ext import zoo


def patch_masks(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """Pixel masks [n, H, W] -> which patches touch the object [n, rows * cols]."""
    n, h, w = masks.shape
    grid = masks.reshape(n, h // patch, patch, w // patch, patch).any(dim=(2, 4))
    return grid.reshape(n, -1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = px.load("builtin:shapes-vit")
    scenes = zoo.heldout("shapes-vit", n=args.n, seed=args.seed)
    images = zoo.normalize(scenes.images, "shapes-vit")
    on_object = patch_masks(scenes.masks, model.layout.patch_size[0])
    labels = torch.as_tensor(scenes.labels)
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    result = px.compare_attributions(model, images, target=labels, baseline="mean")
    table = result.to_dataframe().set_index("method")
    print(f"builtin:shapes-vit, {args.n} held-out scenes (seed {args.seed}), accuracy {accuracy:.3f}; "
          "target: the true class; removed patches -> the image mean")
    print("| method | pointing game | mask share | deletion AUC (lower better) | insertion AUC (higher better) "
          "| seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method in table.index:
        maps = result.part(method).values.reshape(args.n, -1).float()
        top = maps.argmax(-1)
        pointing = on_object[torch.arange(args.n), top].float().mean().item()
        positive = maps.clamp(min=0)
        share = ((positive * on_object).sum(-1) / positive.sum(-1).clamp(min=1e-12)).mean().item()
        row = table.loc[method]
        print(f"| {method} | {pointing:.2f} | {share:.2f} | {row['deletion']:.3f} | {row['insertion']:.3f} | "
              f"{row['seconds']:.2f} |")


if __name__ == "__main__":
    main()
