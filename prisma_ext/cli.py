"""The ``prisma-ext`` command.

``prisma-ext report`` writes one self-contained HTML report explaining a model's prediction on
one image (the work is in ``prisma_ext.report``). ``prisma-ext inspect`` (what the bare
command runs) prints a model's architecture, token layout, hook sites and top-k classes.
``prisma-ext models`` lists what loads; ``prisma-ext sites MODEL`` lists a model's sites;
``prisma-ext sae ...`` caches, trains, evaluates and shows sparse autoencoders (``prisma_ext.cli_sae``).

Bad input (a missing or unreadable image, an unknown model) ends with one line on stderr,
``prisma-ext: error: ...``, and exit status 2, the same as argparse's usage errors.

Heavy libraries (torch, timm, transformer_lens) are imported inside the functions that need
them, so ``import prisma_ext.cli`` and ``prisma-ext --help`` stay fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

STARTED = time.perf_counter()  # the command's clock: the report's timing table counts imports from here

PROG = "prisma-ext"
DEFAULT_MODEL = "builtin:shapes-vit"  # inspect's and report's: its weights ship, so it runs offline
COMMANDS = ("inspect", "report", "models", "sites", "sae")


class _Named(argparse.Action):
    """Stores the value and notes that the user gave it (`<dest>_given`), e.g. an --out they named."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


class _UsageError(ValueError):
    """Bad command-line input found after parsing (reported like any other input error)."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PROG)
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Mechanistic interpretability for vision transformers.",
        epilog=f"Without a command, `{PROG}` runs `{PROG} inspect`.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        help="print a model's architecture, token layout, hook sites and top-k prediction",
        description=(
            "Load a model as report does (the same weights, image and classes), print its architecture "
            "summary, token layout and every hook site with its shape (batch size 1), then classify one image."
        ),
    )
    _add_model_options(p)
    p.add_argument("--pretrained", action="store_true", help=argparse.SUPPRESS)  # the default now; kept working
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="how many classes to print (default: 5)")
    p.set_defaults(func=cmd_inspect)
    _add_report(sub)
    p = sub.add_parser("models", help="list the models and sources that load",
                       description="List what px.load takes: built-in models, and the timm, open_clip and "
                                   "Hugging Face configurations the parity census reproduced or refused.")
    p.add_argument("--all", action="store_true", help="list every reproduced name")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("sites", help="list a model's hook sites and their shapes",
                       description="Load a model (random weights for named sources: shapes only) and list "
                                   "every hook site with its shape at batch size 1.")
    p.add_argument("model", metavar="MODEL", help="model source, e.g. builtin:shapes-vit or timm:vit_small_patch16_224")
    p.set_defaults(func=cmd_sites)
    from prisma_ext.cli_sae import add_sae_parser

    add_sae_parser(sub)
    return parser


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --image and --random-weights, the same for inspect and report."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model source: builtin:shapes-vit, builtin:shapes-clip, timm:NAME, open_clip:ARCH/TAG "
                        f"or hf:REPO (default: {DEFAULT_MODEL})")
    p.add_argument("--image", default=None, metavar="PATH|builtin:NAME",
                   help="image file, or builtin:chelsea|astronaut|coffee, or a scene such as builtin:circle or "
                        "builtin:red-triangle (default: a scene of the model's classes, else builtin:chelsea)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights for timm/open_clip/hf sources (offline; the prediction then means "
                        "nothing); default: the source's pretrained weights (downloaded if not cached)")


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write a self-contained HTML report explaining one prediction",
        description=(
            "Explain a model's prediction on one image in one HTML file (opens offline): prediction, "
            "patch logit lens, direct logit attribution by layer and head, CLS attribution over patches, "
            "an attention-head gallery, activation patching against a corrupted image, and our maps "
            "compared with Captum's (deletion/insertion AUC, seconds)."
        ),
    )
    _add_model_options(p)
    p.add_argument("--target", default=None, metavar="CLASS",
                   help="class to explain, by name or index (default: the model's top class)")
    p.add_argument("--corrupted", default="auto", metavar="auto|blur|PATH|builtin:NAME",
                   help="image for activation patching (default auto: for a scene, the same scene with the "
                        "runner-up class's object in its place; otherwise the image blurred)")
    p.add_argument("--out", default="report.html", metavar="PATH", action=_Named,
                   help="output file, replaced if it exists (default: report.html, or report-1.html, ... if that "
                        "exists: a file you did not name is never replaced)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes in the prediction table (default: 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--thorough", action="store_true",
                   help="the full version of every section (every token, layer and head patched; 50 IG steps, "
                        "one ablation per patch, 16-step curves); the default scales them to the model")
    p.set_defaults(func=cmd_report)


# ---------------------------------------------------------------------------------------------
# inspect


def _site_table(shapes: dict) -> str:
    if not shapes:
        return "(no hook sites)"
    width = max(len(name) for name in shapes)
    rows = [f"{'site':<{width}}  shape", f"{'-' * width}  {'-' * 5}"]
    for name, shape in shapes.items():
        rows.append(f"{name:<{width}}  ({', '.join(str(int(d)) for d in shape)})")
    return "\n".join(rows)


def _top_k_lines(probs, k: int, class_names: Sequence[str] | None) -> list[str]:
    import torch

    k = min(k, probs.shape[-1])
    values, indices = torch.topk(probs, k)
    lines = []
    for rank, (p, i) in enumerate(zip(values.tolist(), indices.tolist()), start=1):
        if class_names is not None and i < len(class_names):
            label = f"{class_names[i]} (class {i})"
        else:
            label = f"class {i}"
        lines.append(f"{rank:>3}. {p:7.2%}  {label}")
    return lines


def _section(title: str) -> None:
    print(f"\n== {title} ==")


def cmd_inspect(args: argparse.Namespace) -> int:
    """The model, image and classes are resolved as `report` resolves them (`report.build`), so
    the two commands print the same prediction for the same arguments."""
    if args.top_k < 1:
        raise _UsageError(f"--top-k must be at least 1, got {args.top_k}")
    from prisma_ext.report.inputs import check_spec

    check_spec(args.image)  # a bad image fails in a moment, before the heavy imports

    from prisma_ext.report.build import load_model, model_input, predict

    weights = "random" if args.random_weights else "pretrained"
    print(f"{PROG} inspect: {args.model} ({weights} weights)")
    model, source = load_model(args.model, pretrained=not args.random_weights)

    _section("architecture")
    print(model.summary())
    _section("token layout")
    print(model.layout.describe())
    shapes = model.site_shapes()
    _section(f"hook sites ({len(shapes)}, batch size 1)")
    print(_site_table(shapes))

    image, x = model_input(model, source, args.image)
    _, probs = predict(model, x)
    k = min(args.top_k, probs.shape[-1])
    _section(f"top-{k} prediction")
    print(f"image: {image.name}, model input {tuple(x.shape)}")
    if hasattr(model, "use_zero_shot_head"):
        print(f"(CLIP: zero-shot over {len(model.class_names or [])} class prompts)")
    if args.random_weights:
        print("(random weights: these classes mean nothing; leave out --random-weights for real ones)")
    for line in _top_k_lines(probs, k, model.class_names):
        print(line)
    return 0


# ---------------------------------------------------------------------------------------------
# report, models, sites


def cmd_report(args: argparse.Namespace) -> int:
    from prisma_ext.report.build import build_report, stderr_log

    out = args.out if getattr(args, "out_given", False) else None  # an unnamed default never replaces a file
    build_report(args.model, image=args.image, target=args.target, corrupted=args.corrupted, out=out,
                 pretrained=not args.random_weights, top_k=args.top_k, log=None if args.quiet else stderr_log,
                 thorough=args.thorough, started=STARTED)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from prisma_ext.catalog import models_text

    print(models_text(full=args.all))
    return 0


def cmd_sites(args: argparse.Namespace) -> int:
    from prisma_ext.loading import load

    model = load(args.model, pretrained=args.model.startswith("builtin:"))
    shapes = model.site_shapes()
    print(f"{args.model}: {model.layout.describe()}")
    print(f"{len(shapes)} hook sites (batch size 1)")
    print(_site_table(shapes))
    return 0


# ---------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `prisma-ext` and `prisma-ext --model ...` mean `prisma-ext inspect ...`.
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv = ["inspect", *argv]
    args = build_parser().parse_args(argv)  # usage errors: argparse exits with status 2

    from prisma_ext.errors import PrismaError

    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: no traceback; a report is written only at the end, so no partial file
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `prisma-ext inspect | head`
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (PrismaError, ValueError, OSError) as exc:
        # Bad input: unknown model, class or site, missing or unreadable image, weights that
        # cannot be fetched, an output path that cannot be written.
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
