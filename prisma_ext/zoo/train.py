"""Train the zoo models on seeded scenes and write NAME.safetensors + NAME.json per model.

    python -m prisma_ext.zoo.train                        # both models, into prisma_ext/zoo/
    python -m prisma_ext.zoo.train --quick --out /tmp/z   # a few steps: checks the script runs

Training batch k of a model is `make_scenes(batch_size, seed=1_000_000 * (seed + 1) + k)`;
the held-out accuracies in the JSON use `HELDOUT_SEED`, outside that range. The reported
numbers are measured on the weights as saved, reloaded through `prisma_ext.zoo.build`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.scenes import COLOURS, SHAPES, Scenes, make_scenes
from . import MODELS, ZOO_DIR
from .factory import build_module, save_weights

DATA: dict[str, Any] = dict(size=64, classes="shapes")  # make_scenes arguments of both models
MEAN = STD = (0.5, 0.5, 0.5)
HELDOUT_SEED, HELDOUT_N = 7, 2000
VIT: dict[str, Any] = dict(
    library="timm", timm_name="vit_tiny_patch16_224", timm_tag="shapes",  # the tag names these weights
    kwargs=dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0,
                num_classes=len(SHAPES)))
CLIP: dict[str, Any] = dict(library="open_clip", model_cfg=dict(
    embed_dim=64,
    vision_cfg=dict(image_size=64, patch_size=8, width=64, layers=4, head_width=16, mlp_ratio=4.0),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=2, mlp_ratio=4.0)))
# caption templates for contrastive training: (template, names the shape, names the colour)
CAPTIONS: tuple[tuple[str, bool, bool], ...] = (
    ("a {colour} {shape}", True, True), ("a photo of a {colour} {shape}", True, True),
    ("a {shape}", True, False), ("a photo of a {shape}", True, False), ("a {colour} shape", False, True))
ZERO_SHOT_TEMPLATES = ("a {}", "a photo of a {}")


@dataclass(frozen=True)
class Settings:
    """Optimisation settings of one model."""

    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float = 0.05
    eval_n: int = HELDOUT_N


FULL = {"shapes-vit": Settings(steps=600, batch_size=128, lr=2e-3, warmup=60),
        "shapes-clip": Settings(steps=700, batch_size=128, lr=3e-3, warmup=70)}
QUICK = Settings(steps=3, batch_size=16, lr=1e-3, warmup=1, eval_n=32)


def base_info(name: str, seed: int) -> dict[str, Any]:
    """Everything the JSON says before training: how to build the model and feed it."""
    arch = VIT if name == "shapes-vit" else CLIP
    return dict(name=name, **arch, class_names=list(SHAPES), mean=list(MEAN), std=list(STD),
                img_size=DATA["size"], data=dict(DATA), heldout=dict(seed=HELDOUT_SEED), seed=seed)


def batch(seed: int, step: int, size: int) -> Scenes:
    return make_scenes(size, seed=1_000_000 * (seed + 1) + step, **DATA)


def normalized(images: Tensor) -> Tensor:
    return (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def optimiser(model: nn.Module, s: Settings) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with linear warm-up then cosine decay to zero."""
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)

    def factor(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(s.steps - s.warmup, 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(model: nn.Module, s: Settings, loss_fn: Callable[[int], Tensor], log: Callable[[str], None],
        after_step: Callable[[], None] = lambda: None) -> None:
    opt, sched = optimiser(model, s)
    model.train()
    every = max(s.steps // 10, 1)
    for step in range(s.steps):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        after_step()
        if (step + 1) % every == 0 or step + 1 == s.steps:
            log(f"  step {step + 1}/{s.steps}  loss {loss.item():.4f}")
    model.eval()


# ---------------------------------------------------------------------- the classifier
def train_vit(info: dict, s: Settings, log: Callable[[str], None]) -> nn.Module:
    model = build_module(info)

    def loss_fn(step: int) -> Tensor:
        data = batch(info["seed"], step, s.batch_size)
        return F.cross_entropy(model(normalized(data.images)), data.labels)

    fit(model, s, loss_fn, log)
    return model


@torch.no_grad()
def vit_accuracy(model: nn.Module, scenes: Scenes) -> float:
    logits = torch.cat([model(normalized(x)) for x in scenes.images.split(500)])
    return (logits.argmax(-1) == scenes.labels).float().mean().item()


# ---------------------------------------------------------------------- CLIP
def captions_for(scenes: Scenes, rng: np.random.Generator) -> tuple[list[str], Tensor, Tensor]:
    """A random caption template per image -> (captions, names-shape flags, names-colour flags)."""
    picks = rng.integers(0, len(CAPTIONS), len(scenes))
    captions = [CAPTIONS[k][0].format(colour=c, shape=scenes.class_names[y])
                for k, c, y in zip(picks, scenes.colours, scenes.labels.tolist())]
    return (captions, torch.tensor([CAPTIONS[k][1] for k in picks]),
            torch.tensor([CAPTIONS[k][2] for k in picks]))


def contrastive_loss(logits: Tensor, scenes: Scenes, names_shape: Tensor, names_colour: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy, where every caption true of an image counts as its match
    (in a batch of 128 many images share "a red circle"; plain CLIP would call those wrong)."""
    colour = torch.tensor([list(COLOURS).index(c) for c in scenes.colours])
    same_shape = scenes.labels[:, None] == scenes.labels[None, :]
    same_colour = colour[:, None] == colour[None, :]
    true = ((same_shape | ~names_shape[None, :]) & (same_colour | ~names_colour[None, :])).float()
    to_text = F.cross_entropy(logits, true / true.sum(1, keepdim=True))
    to_image = F.cross_entropy(logits.T, (true / true.sum(0, keepdim=True)).T)
    return (to_text + to_image) / 2


def train_clip(info: dict, s: Settings, log: Callable[[str], None]) -> nn.Module:
    import open_clip

    model = build_module(info)
    tokenizer = open_clip.SimpleTokenizer(context_length=info["model_cfg"]["text_cfg"]["context_length"])
    rng = np.random.default_rng(info["seed"])

    def loss_fn(step: int) -> Tensor:
        data = batch(info["seed"], step, s.batch_size)
        captions, names_shape, names_colour = captions_for(data, rng)
        image, text, scale = model(image=normalized(data.images), text=tokenizer(captions))[:3]
        return contrastive_loss(scale * image @ text.T, data, names_shape, names_colour)

    def clamp() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    fit(model, s, loss_fn, log, clamp)
    return model


def combined_classes() -> list[str]:
    """'red square', 'green square', ...: shape-major, so class k is shape k // 8, colour k % 8."""
    return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, scenes: Scenes, classes: Sequence[str], labels: Tensor) -> float:
    import open_clip

    tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
    prompts = [t.format(c) for c in classes for t in ZERO_SHOT_TEMPLATES]
    text = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    text = F.normalize(text.view(len(classes), len(ZERO_SHOT_TEMPLATES), -1).mean(1), dim=-1)
    image = torch.cat([model.encode_image(normalized(x), normalize=True) for x in scenes.images.split(500)])
    return ((image @ text.T).argmax(-1) == labels).float().mean().item()


def clip_accuracies(model: nn.Module, scenes: Scenes) -> dict[str, float]:
    colour = torch.tensor([list(COLOURS).index(c) for c in scenes.colours])
    return dict(shape_accuracy=zero_shot_accuracy(model, scenes, SHAPES, scenes.labels),
                combined_accuracy=zero_shot_accuracy(model, scenes, combined_classes(),
                                                     scenes.labels * len(COLOURS) + colour))


# ---------------------------------------------------------------------- driver
def train_one(name: str, out: Path, seed: int, s: Settings, log: Callable[[str], None],
              command: str = "") -> dict:
    """Train `name`, save it into `out`, measure it reloaded; returns its JSON."""
    from . import build

    info = base_info(name, seed)
    torch.manual_seed(seed)
    log(f"training {name}: {s.steps} steps of {s.batch_size}, lr {s.lr}, {torch.get_num_threads()} threads")
    wall, cpu = time.perf_counter(), time.process_time()
    model = (train_vit if name == "shapes-vit" else train_clip)(info, s, log)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    info["training"] = dict(asdict(s), seed=seed, train_data_seeds=[1_000_000 * (seed + 1),
                            1_000_000 * (seed + 1) + s.steps - 1], seconds=round(wall, 1),
                            cpu_seconds=round(cpu, 1), threads=torch.get_num_threads(),
                            torch=torch.__version__, command=command)
    if name == "shapes-clip":
        info["zero_shot"] = dict(templates=list(ZERO_SHOT_TEMPLATES), combined_classes=combined_classes(),
                                 captions=[c[0] for c in CAPTIONS])
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / f"{name}.safetensors")
    (out / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    reloaded = build(name, pretrained=out / f"{name}.safetensors")
    scenes = make_scenes(s.eval_n, seed=HELDOUT_SEED, **DATA)
    info["heldout"].update(n=s.eval_n)
    if name == "shapes-vit":
        info["heldout"]["accuracy"] = round(vit_accuracy(reloaded, scenes), 4)
        log(f"{name}: held-out accuracy {info['heldout']['accuracy']:.4f} ({wall:.0f} s)")
    else:
        info["zero_shot"].update({k: round(v, 4) for k, v in clip_accuracies(reloaded, scenes).items()})
        log(f"{name}: zero-shot accuracy {info['zero_shot']['shape_accuracy']:.4f} over shapes, "
            f"{info['zero_shot']['combined_accuracy']:.4f} over colour+shape ({wall:.0f} s)")
    (out / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prisma_ext.zoo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ZOO_DIR, help="output folder (default: the package's zoo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="a few tiny steps (a smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    command = " ".join(["python -m prisma_ext.zoo.train", *argv])
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    start = time.perf_counter()
    for name in args.models:
        train_one(name, args.out, args.seed, QUICK if args.quick else FULL[name], log, command)
    log(f"done in {time.perf_counter() - start:.0f} s; wrote {', '.join(args.models)} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
