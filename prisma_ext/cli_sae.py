"""``prisma-ext sae cache | train | eval | report``: sparse autoencoders from the command line.

    prisma-ext sae report                                    # the built-in SAE on the built-in CLIP
    prisma-ext sae cache --model builtin:shapes-vit --site blocks.2.hook_resid_post --out acts/
    prisma-ext sae train --store acts/ --out my-sae/ --architecture topk --d-sae 512 --k 16
    prisma-ext sae eval --sae my-sae/
    prisma-ext sae report --sae my-sae/ --out latents.html

Images (`--images`): `builtin:scenes` (seeded scenes like the built-in models' training data, at
the model's input size; `--n`, `--seed`) or a folder of image files (each preprocessed as the
model's `preprocess` does). The model and site default to those the SAE's cfg.json names.
Progress goes to stderr (`-q` turns it off). The heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

BUILTIN = "builtin"
SCENES = "builtin:scenes"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def add_sae_parser(sub: Any) -> None:
    """The `sae` command and its four subcommands, on the top-level parser's subparsers."""
    p = sub.add_parser("sae", help="sparse autoencoders: cache activations, train, evaluate, latent dashboard",
                       description="Sparse autoencoders over a site's activations (docs/sae.md).")
    group = p.add_subparsers(dest="sae_command", metavar="SUBCOMMAND", required=True)

    c = group.add_parser("cache", help="store a site's activations over images in safetensors shards")
    _model_site(c, required=True)
    _images(c, default_n=1000)
    c.add_argument("--tokens", choices=("all", "cls", "patches", "registers"), default="all")
    c.add_argument("--out", required=True, metavar="DIR", help="the store's folder (an interrupted cache resumes)")
    c.add_argument("--images-per-shard", type=int, default=256)
    c.set_defaults(func=cmd_cache)

    t = group.add_parser("train", help="train an SAE on a store; saved in SAELens's layout")
    t.add_argument("--store", required=True, metavar="DIR")
    t.add_argument("--out", required=True, metavar="DIR", help="folder for cfg.json + sae_weights.safetensors")
    t.add_argument("--architecture", choices=("topk", "batchtopk", "jumprelu"), default="topk")
    t.add_argument("--d-sae", type=int, required=True)
    t.add_argument("--k", type=int, default=None, help="latents per token (topk, batchtopk)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=1024)
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint", metavar="DIR", default=None, help="resumable training state")
    t.add_argument("--overwrite", action="store_true", help="replace an SAE already in --out")
    t.set_defaults(func=cmd_train)

    e = group.add_parser("eval", help="explained variance, L0, dead latents and the cost to the model's output")
    _sae_option(e)
    _model_site(e, required=False)
    _images(e, default_n=200)
    e.set_defaults(func=cmd_eval)

    r = group.add_parser("report", help="write a latent dashboard (self-contained HTML)")
    _sae_option(r)
    _model_site(r, required=False)
    _images(r, default_n=300)
    r.add_argument("--latents", type=int, nargs="+", default=None, help="latents to show (default: chosen)")
    r.add_argument("--out", default="latents.html", metavar="PATH", help="the HTML file (default: latents.html)")
    r.set_defaults(func=cmd_report)
    for parser in (c, t, e, r):
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def _model_site(p: argparse.ArgumentParser, required: bool) -> None:
    default = "" if required else " (default: the one the SAE's cfg.json names)"
    p.add_argument("--model", required=required, help=f"model source, e.g. builtin:shapes-clip{default}")
    p.add_argument("--site", required=required, help=f"site, e.g. blocks.3.hook_resid_post{default}")
    p.add_argument("--random-weights", action="store_true", help="random weights for timm/open_clip/hf sources")


def _sae_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", default=BUILTIN, metavar="DIR|builtin",
                   help="an SAE folder in SAELens's layout, or builtin (default): the shipped SAE")


def _images(p: argparse.ArgumentParser, default_n: int) -> None:
    p.add_argument("--images", default=SCENES, metavar=f"{SCENES}|DIR",
                   help=f"{SCENES} (seeded scenes) or a folder of image files (default: {SCENES})")
    p.add_argument("--n", type=int, default=default_n, help=f"how many scenes (default: {default_n})")
    p.add_argument("--seed", type=int, default=12_345, help="the scenes' seed")


def _log(args: argparse.Namespace):
    return (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def load_images(model: Any, spec: str, n: int, seed: int) -> tuple[Any, Any]:
    """(model inputs [N, 3, H, W], the Scenes they came from or None for a folder)."""
    import torch

    from .errors import InputError

    cfg = model.visual.cfg if hasattr(model, "visual") else model.cfg
    if spec == SCENES:
        if n < 1:
            raise InputError(f"--n must be at least 1, got {n}")
        from .data.scenes import make_scenes
        from .report.inputs import scene_options, source_of

        scenes = make_scenes(n, seed=seed, size=cfg.img_size[0], **scene_options(source_of(model)))
        from .images import normalize_pixels

        return normalize_pixels(scenes.images, cfg).to(dtype=cfg.dtype), scenes
    folder = Path(spec)
    if not folder.is_dir():
        raise InputError(f"--images {spec!r}: expected {SCENES} or a folder of image files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"--images {spec!r}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    from PIL import Image

    batch = []
    for path in files:
        with Image.open(path) as image:
            batch.append(model.preprocess(image.convert("RGB")).reshape(3, *cfg.img_size))
    return torch.stack(batch), None


def _load_model(source: str, random_weights: bool) -> Any:
    from .report.build import load_model

    model, _ = load_model(source, pretrained=not random_weights)
    return model


def _load_sae(spec: str, model: str | None, site: str | None) -> tuple[Any, str, str, dict]:
    """(the SAE, the model source, the site, its metadata) from --sae and the overrides."""
    from .errors import InputError

    if spec == BUILTIN:
        from .sae.builtin import builtin_sae

        sae, meta = builtin_sae()
    else:
        from .sae.formats import load_saelens

        sae, meta = load_saelens(spec)
    model, site = model or meta.get("model_name"), site or meta.get("hook_name")
    if not model or not site:
        raise InputError(f"--sae {spec}: its cfg.json names no model or site; pass --model and --site")
    return sae, model, site, meta


def cmd_cache(args: argparse.Namespace) -> int:
    from .sae.store import cache_activations

    model = _load_model(args.model, args.random_weights)
    images, _ = load_images(model, args.images, args.n, args.seed)
    manifest = cache_activations(model, args.site, images, args.out, tokens=args.tokens,
                                 images_per_shard=args.images_per_shard, progress=_progress(args))
    rows = sum(s["rows"] for s in manifest["shards"])
    _log(args)(f"stored {rows} rows of {args.site} ({manifest['d_in']} wide) over {manifest['n_images']} images "
               f"in {len(manifest['shards'])} shards under {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .sae.formats import save_saelens
    from .sae.store import ActivationStore
    from .sae.train import train_sae

    store = ActivationStore(args.store)
    out = Path(args.out)
    if not args.overwrite and any((out / name).exists() for name in ("cfg.json", "sae_weights.safetensors")):
        from .errors import InputError

        raise InputError(f"--out {args.out} already holds an SAE; pass --overwrite to replace it")
    sae, log = train_sae(store, args.d_sae, args.architecture, args.k, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, checkpoint=args.checkpoint,
                         progress=_progress(args))
    manifest = store.manifest
    save_saelens(sae, out, hook_name=manifest["site"], model_name=manifest["model"], overwrite=args.overwrite,
                 metadata={"prisma_ext_store": str(Path(args.store).resolve()), "tokens": manifest["tokens"]})
    _log(args)(f"wrote {out}: explained variance {log['explained_variance']:.3f}, L0 {log['l0']:.1f}, "
               f"{log['dead_fraction']:.1%} dead latents")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .analysis.backend import Backend
    from .sae.downstream import downstream
    from .sae.train import evaluate

    sae, source, site, _ = _load_sae(args.sae, args.model, args.site)
    model = _load_model(source, args.random_weights)
    images, scenes = load_images(model, args.images, args.n, args.seed)
    tower = model.visual if hasattr(model, "visual") else model
    acts = Backend.of(model).run(images, read=[site]).acts[site]
    quality = evaluate(sae, acts.reshape(-1, acts.shape[-1]).float())
    labels = scenes.labels if scenes is not None and source.startswith(BUILTIN) else None
    scores = downstream(tower, sae, site, images, labels=labels)
    print(f"{args.sae} at {site} of {source}, over {len(images)} images:")
    for key, value in {**quality, **scores}.items():
        print(f"  {key:<20} {value:.4f}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .sae.dashboard import sae_dashboard

    sae, source, site, meta = _load_sae(args.sae, args.model, args.site)
    model = _load_model(source, args.random_weights)
    images, _ = load_images(model, args.images, args.n, args.seed)
    concepts = meta.get("info", {}).get("measured", {}).get("concepts", {})
    names: dict[int, list[str]] = {}
    for concept, found in concepts.items():
        names.setdefault(found["latent"], []).append(concept)
    latents = args.latents or (sorted(names) if names else None)
    path = sae_dashboard(model, sae, site, images, args.out, latents=latents,
                         names={k: ", ".join(v) for k, v in names.items()}, log=_log(args))
    _log(args)(f"wrote {path}")
    return 0
