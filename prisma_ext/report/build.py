"""Building the HTML report: one self-contained file explaining one model's prediction on one image.

    from prisma_ext.report import build_report
    report = build_report("builtin:shapes-vit", image="builtin:red-circle", out="report.html")
    report.path, report.n_figures, report.seconds

Sections (`sections.py`, `clip_section.py`, `experiments.py`): prediction, patch logit lens, direct
logit attribution by layer and head, for a CLIP model its image embedding split by head (with
TextSpan texts and high-norm tokens), CLS attribution over patches, an attention-head gallery,
activation patching against a corrupted image, and our attribution maps against Captum's. Every input is checked
before the first progress line, and the file is written to a temporary name and renamed at the
end, so bad input leaves no report behind.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, PrismaError

DEFAULT_MODEL = "builtin:shapes-vit"
DEFAULT_PHOTO = "builtin:chelsea"
DEFAULT_OUT = "report.html"
TIMING_SLOT = "<!-- prisma-ext timing table -->"  # filled in once the page is rendered

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    """A progress line on stderr; a closed stderr (e.g. piped into `head`) only stops them."""
    try:
        print(f"prisma-ext report: {message}", file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):
        pass


@dataclass
class Report:
    """What `build_report` wrote: the file, its figure count, seconds per section."""

    path: Path
    n_figures: int
    seconds: dict[str, float] = field(default_factory=dict)


def default_out(folder: str | os.PathLike = ".") -> Path:
    """Where a report goes when nobody named a file: report.html, or the first of report-1.html,
    report-2.html, ... that does not exist (a file the user did not name is never replaced)."""
    folder = Path(folder)
    path, n = folder / DEFAULT_OUT, 0
    while path.exists():
        n += 1
        path = folder / f"{Path(DEFAULT_OUT).stem}-{n}{Path(DEFAULT_OUT).suffix}"
    return path


def check_out(out: str | os.PathLike) -> Path:
    """The output path, checked before any work: not a directory, in a folder that exists."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise InputError(f"--out {str(path)!r} is a directory; give a file name such as report.html")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"--out {str(path)!r}: folder {str(parent)!r} does not exist")
    try:  # a real write, not os.access: root passes that test for a read-only file system
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"--out {str(path)!r}: folder {str(parent)!r} is not writable "
                         f"({err.strerror or err})") from None
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it to `path`."""
    from .._files import replacing

    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------- inputs


def load_model(source: Any, pretrained: bool = True) -> tuple[Any, str]:
    """A hooked model from a source name (or a model already loaded); CLIP models get a
    zero-shot head over their class list."""
    from .inputs import is_clip, source_of, zero_shot_classes

    if isinstance(source, str):
        from ..loading import load

        try:
            model = load(source, pretrained=pretrained)
        except PrismaError as err:
            if "pretrained weights" in str(err) and "Offline" in str(err):
                raise PrismaError(f"{err} (on the command line: --random-weights)") from err
            raise
        name = source
    else:
        model = source
        name = source_of(model) or type(model).__name__
    model.eval()
    if is_clip(model) and getattr(model.visual, "head", None) is None:
        names, templates = zero_shot_classes(name)
        model.use_zero_shot_head(names, templates)
    return model, name


def default_image(model: Any) -> str:
    """A scene of one of the model's classes when it knows scene objects, else a photo."""
    from .inputs import _parse_scene

    for name in model.class_names or []:
        if _parse_scene(str(name)) is not None:
            return f"builtin:{name}"
    return DEFAULT_PHOTO


def model_input(model: Any, source: str, image: str | None):
    """(the image at the model's size, its normalised input [1, 3, H, W]) of an image spec
    (default: `default_image`), a scene drawn as the built-in model's training scenes were."""
    from ..analysis.backend import Backend
    from .inputs import read_image, scene_options, to_input

    cfg = Backend.of(model).cfg
    clean = read_image(image or default_image(model), cfg, scene_options(source))
    return clean, to_input(clean.pixels, cfg)


def predict(model: Any, x) -> tuple[Any, Any]:
    """(logits [n_classes], probabilities [n_classes]) of one image. CLIP: the zero-shot head's
    logits and CLIP's own probabilities, softmax(exp(logit_scale) * cosine)."""
    import torch

    from .inputs import is_clip

    with torch.no_grad():
        if is_clip(model):
            logits = model.visual(x)[0]
            norm = model.encode_image(x)[0].norm()
            probs = (model.logit_scale.exp() * logits / norm).softmax(-1)
        else:
            logits = model(x)[0]
            probs = logits.softmax(-1)
    return logits.float().cpu(), probs.float().cpu()


def _foil_candidates(logits, target: int) -> list[int]:
    import torch

    return [i for i in torch.argsort(logits, descending=True).tolist() if i != target]


def prepare(model: Any = DEFAULT_MODEL, image: str | None = None, target: str | int | None = None,
            corrupted: str = "auto", pretrained: bool = True, top_k: int = 5, thorough: bool = False):
    """Load and check everything a report needs; raises PrismaError / OSError on bad input.
    `thorough`: the full versions of every section (`report.settings`)."""
    from ..analysis.backend import Backend
    from .inputs import (
        _parse_scene,
        check_spec,
        class_index,
        corrupted_image,
        is_clip,
        scene_options,
        to_input,
    )
    from .sections import Context
    from .settings import settings_for

    if top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {top_k}")
    check_spec(image)
    check_spec(corrupted, "--corrupted", extra=("auto", "blur"))
    model_source = model
    model, source = load_model(model, pretrained)
    cfg = Backend.of(model).cfg
    scene = scene_options(source)
    clean, x = model_input(model, source, image)
    logits, probs = predict(model, x)
    given = target is not None
    target_index = class_index(model, str(target)) if given else int(logits.argmax())
    candidates = _foil_candidates(logits, target_index)
    names = list(model.class_names or [])
    scene_foils = [names[i] for i in candidates if i < len(names) and _parse_scene(str(names[i]))
                   and (clean.scene is None or names[i] != clean.scene[1])]
    bad = corrupted_image(corrupted, clean, cfg, scene_foils[0] if scene_foils else None, scene)
    x_bad = to_input(bad.pixels, cfg)
    bad_top = int(predict(model, x_bad)[0].argmax())
    foil = bad_top if bad_top != target_index else candidates[0]
    return Context(model=model, source=source, clean=clean, corrupted=bad, x=x, x_corrupted=x_bad,
                   logits=logits, probs=probs, target=target_index, foil=foil, target_given=given,
                   top_k=top_k, is_clip=is_clip(model), settings=settings_for(cfg, thorough),
                   random_weights=not pretrained and isinstance(model_source, str)
                   and not model_source.startswith("builtin:"))


# ------------------------------------------------------------------------------- the report


def _intro(page, ctx) -> None:
    from .. import __version__

    first = ctx.model.summary().splitlines()[0]
    page.intro(f"model {ctx.source}{' (random weights)' if ctx.random_weights else ''}: {first}")
    page.intro(f"image {ctx.clean.name}; target {ctx.name(ctx.target)!r} (class {ctx.target}); "
               f"corrupted image {ctx.corrupted.name}")
    page.intro(ctx.settings.describe())
    page.intro(f"prisma-ext {__version__}, {time.strftime('%Y-%m-%d %H:%M')}; "
               "self-contained: opens without a network")


def _sections(ctx) -> tuple:
    """(anchor, title, run(ctx, page)) of every section for this model, in order (a CLIP model
    on the TL backend also gets its embedding split by head)."""
    from . import clip_section as cs
    from . import experiments as ex
    from . import sections as se

    clip = (("embedding-by-head", "The image embedding, split by head", cs.embedding_by_head),) \
        if cs.splits_by_head(ctx) else ()
    return (
        ("prediction", "Prediction", se.prediction),
        ("logit-lens", "Patch logit lens", se.logit_lens),
        ("logit-attribution", "Direct logit attribution", se.logit_attribution),
        *clip,
        ("cls-attribution", "CLS attribution over patches", se.cls_attribution),
        ("attention-heads", "Attention heads", se.attention_heads),
        ("patching", "Activation patching", ex.patching),
        ("captum", "Compared with Captum", ex.captum),
    )


def build_report(model: Any = DEFAULT_MODEL, image: str | None = None, target: str | int | None = None,
                 corrupted: str = "auto", out: str | os.PathLike | None = None, pretrained: bool = True,
                 top_k: int = 5, log: Log | None = stderr_log, thorough: bool = False,
                 started: float | None = None) -> Report:
    """Check the inputs, run every section, write one HTML file. See the module docstring.

    model: a source name (builtin:shapes-vit, timm:NAME, open_clip:ARCH/TAG, hf:REPO) or a
    loaded model; image: a path or builtin:NAME (default: a scene of the model's classes, or
    scikit-image's cat); target: a class name or index (default: the top class); corrupted:
    "auto", "blur", a path or builtin:NAME (see `prisma_ext.report.inputs`); out: the file (replaced if
    it exists: you named it; default: report.html, or report-1.html ... when that exists); log:
    progress lines (default: stderr; None: quiet); thorough: the full versions of every section
    (default: settings scaled to the model, `prisma_ext.report.settings`); started: the
    `time.perf_counter()` when the process started its work (the command passes it), so the
    timing table counts start-up and imports too.
    """
    from .page import Page

    say = log or (lambda _: None)
    path = check_out(out if out is not None else default_out())
    if out is None and path.name != DEFAULT_OUT:
        say(f"{DEFAULT_OUT} exists and --out names no file: writing {path} instead (--out PATH names the file)")
    start = time.perf_counter()
    ctx = prepare(model, image, target, corrupted, pretrained, top_k, thorough)
    ctx.progress = log is not None
    say(f"{ctx.source} on {ctx.clean.name}, target {ctx.name(ctx.target)!r}, corrupted {ctx.corrupted.name}")
    from .sections import out_of_distribution

    if out_of_distribution(ctx):
        say(f"warning: {ctx.clean.name} is not like {ctx.source}'s training scenes (out of distribution; the "
            "report says so at the top)")
    seconds = {"loading": time.perf_counter() - start}
    page = Page(f"prisma-ext report: {ctx.source}")
    _intro(page, ctx)
    sections = _sections(ctx)
    for i, (anchor, title, run) in enumerate(sections, start=1):
        say(f"[{i}/{len(sections)}] {title.lower()} ...")
        t0 = time.perf_counter()
        page.section(anchor, title)
        try:
            run(ctx, page)
        except PrismaError as err:  # a method that does not apply to this model says why
            page.note(f"Not available for this model: {err}", css="skipped")
            say(f"[{i}/{len(sections)}] {title.lower()}: skipped ({err})")
        seconds[title] = time.perf_counter() - t0
    page.section("timing", "Timing")
    t0 = time.perf_counter()
    page.raw(TIMING_SLOT)
    page.note(f"{page.n_figures} figures. Wall-clock seconds on this machine; the parts add up to the total. "
              "Loading includes building the model and checking it against the source's own forward.")
    html = page.render()
    seconds["writing the page"] = time.perf_counter() - t0
    if started is not None:
        seconds = {"start-up and imports": start - started, **seconds}
    total = sum(seconds.values())
    rows = [[k, round(v, 2)] for k, v in seconds.items()] + [["total", round(total, 2)]]
    write_atomic(path, html.replace(TIMING_SLOT, page.table_html(rows, ["part", "seconds"], best=len(rows) - 1), 1))
    say(f"wrote {path} ({page.n_figures} figures, {path.stat().st_size / 1e6:.1f} MB) in {total:.0f} s")
    return Report(path, page.n_figures, seconds)
