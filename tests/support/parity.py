"""The parity census: every named configuration of the supported sources, built small with every
flag kept and every parameter randomised, loaded with `px.load` (which checks itself against the
source's own forward), and measured: reproduced (with the largest difference) or refused (with
the feature named). `scripts/parity.py` writes the table in docs/architectures.md from these rows;
tests/docs/test_parity.py recomputes them and checks the docs cannot drift.

Shrinking keeps a config's structure: fewer layers (2; 3 for per-layer tables), a narrower width,
a two-by-two patch grid at the model's own patch size. A config whose family cannot be shrunk
that way (non-ViT trunks) is built on the meta device at full size, which is enough to see it
refused; if such a model were not refused, that is reported as a failure, not a row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tests.support.models import randomize_

TOLERANCE = 1e-4
PACKAGED = Path(__file__).resolve().parents[2] / "prisma_ext" / "data" / "parity.json"


@dataclass(frozen=True)
class Row:
    family: str  # "timm", "open_clip", "hf"
    source: str  # the library's class (timm `Eva`, open_clip `CustomTextCLIP`, `SiglipModel` ...)
    name: str  # the named configuration
    status: str  # "reproduced" or "refused: <the feature named>"
    error: float | None  # largest |difference| from the source's own outputs (reproduced rows)

    @property
    def reproduced(self) -> bool:
        return self.status == "reproduced"

    def cells(self) -> list[str]:
        error = "" if self.error is None else f"{self.error:.0e}"
        return [self.family, f"`{self.source}`", f"`{self.name}`", self.status, error]


# ---------------------------------------------------------------- measuring one model
def _refusal(err: Exception) -> str:
    text = str(err)
    for marker in ("): ", "refused: ", "tower: "):
        if marker in text:
            text = text.split(marker, 1)[-1]
    text = text.split(" is not supported")[0].split(" are not supported")[0]
    return "refused: " + text.split(". ")[0].strip()[:160]


def measure(build: Callable[[], nn.Module], family: str, name: str, compare: Callable | None = None) -> Row:
    """Build, load and compare one configuration; `compare(source, loaded) -> max |difference|`
    (default: by what was loaded, a CLIP's embeddings or a ViT's output)."""
    import prisma_ext as px
    from prisma_ext.errors import UnsupportedModelError

    module = build()
    source = type(module).__name__
    on_meta = any(p.is_meta for p in module.parameters())
    try:
        loaded = px.load(module)
    except UnsupportedModelError as err:
        return Row(family, source, name, _refusal(err), None)
    except Exception as err:
        raise AssertionError(f"{family} {name}: {type(err).__name__}: {err}") from err
    if on_meta:
        raise AssertionError(f"{family} {name}: could not be built small, and the full-size meta build was not refused")
    if compare is None:
        compare = _compare_clip if hasattr(loaded, "text") else _compare_vit
    with torch.no_grad():
        error = float(compare(module, loaded))
    return Row(family, source, name, "reproduced", error)


def _images(size, channels: int = 3, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(7))


def _compare_vit(module: nn.Module, hooked) -> float:
    images = _images(hooked.cfg.img_size, hooked.cfg.in_chans)
    from prisma_ext.adapters import adapter_for

    want = adapter_for(module).reference_output(module, images)
    return (hooked(images) - want).abs().max().item()


def _compare_clip(module: nn.Module, clip) -> float:
    from prisma_ext.adapters import adapter_for
    from tests.support.clip_models import text_tokens_for

    adapter = adapter_for(module)
    images = _images(clip.visual.cfg.img_size)
    tokens = text_tokens_for(clip.text.cfg, batch=2)
    image = (clip.encode_image(images) - adapter.reference_image_embed(module, images)).abs().max().item()
    text = (clip.encode_text(tokens) - adapter.reference_text_embed(module, tokens)).abs().max().item()
    return max(image, text)


# ---------------------------------------------------------------- timm
TIMM_MODULES = ("vision_transformer", "deit", "eva")


def _timm_build(name: str) -> nn.Module:
    import timm

    with torch.device("meta"):  # the full-size config without weights: its patch size and kv heads
        full = timm.create_model(name, pretrained=False).eval()
    patch = full.patch_embed.patch_size[0]
    shrink = dict(depth=3 if "mixed" in name else 2, img_size=2 * patch)
    attns = [getattr(blk, "attn", None) for blk in full.blocks]
    if any(hasattr(a, "num_kv_heads") for a in attns):  # a per-block tuple in the config: one per shrunk block
        grouped = any(a.num_kv_heads != a.num_heads for a in attns)
        depth = shrink["depth"]  # grouped-query attention where the config has it (in its last block here)
        shrink["num_kv_heads"] = (2,) * (depth - 1) + ((1,) if grouped else (2,))
    for width in (dict(embed_dim=32, num_heads=2), dict(embed_dim=64, num_heads=4)):
        try:
            model = timm.create_model(name, pretrained=False, **shrink, **width)
        except (TypeError, AssertionError, ValueError, RuntimeError):
            continue
        return randomize_(model.eval(), seed=len(name))
    return full


def timm_rows() -> Iterator[Row]:
    import timm

    for name in timm.list_models(module=list(TIMM_MODULES)):
        yield measure(lambda n=name: _timm_build(n), "timm", name, _compare_vit)


# ---------------------------------------------------------------- open_clip
def open_clip_rows() -> Iterator[Row]:
    import open_clip
    from open_clip.factory import get_model_config

    from tests.support.clip_models import small_open_clip, small_open_clip_hf_text, small_open_clip_timm

    for name in open_clip.list_models():
        cfg = get_model_config(name)
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if text.get("hf_model_name"):
            yield _hf_text_row(name) if "multimodal_cfg" not in cfg else measure(
                lambda n=name: small_open_clip_hf_text(n, seed=len(n)), "open_clip", name)
            continue
        if isinstance(vision.get("layers"), (list, tuple)):
            yield measure(lambda n=name: _meta_open_clip(n), "open_clip", name, _compare_clip)
        elif vision.get("timm_model_name"):
            yield measure(lambda n=name: small_open_clip_timm(n, seed=len(n), on_meta=True), "open_clip", name,
                          _compare_clip)
        else:
            yield measure(lambda n=name: small_open_clip(n, seed=len(n)), "open_clip", name, _compare_clip)


def _hf_text_row(name: str) -> Row:
    """A config with a Hugging Face text encoder: refused by the TL backend (the feature named),
    traced and verified by the nnsight backend (the row says both)."""
    import prisma_ext as px
    from tests.support.clip_models import small_open_clip_hf_text

    module = small_open_clip_hf_text(name, seed=len(name))
    refused = measure(lambda: module, "open_clip", name)
    if refused.reproduced:
        raise AssertionError(f"open_clip {name}: a Hugging Face text tower was converted for the TL backend")
    px.load(module, backend="nnsight")  # raises unless every site reads and the image tower's match
    return Row("open_clip", "CustomTextCLIP", name, f"{refused.status} (TL); traced on nnsight", None)


def _meta_open_clip(name: str) -> nn.Module:
    from prisma_ext.sources.open_clip import _meta_model

    with torch.device("meta"):
        return _meta_model(name)


# ---------------------------------------------------------------- all
def all_rows() -> list[Row]:
    return [*timm_rows(), *open_clip_rows(), *hf_rows()]


def hf_rows() -> Iterator[Row]:
    from tests.support.hf_models import HF_BUILDERS

    for name, build in HF_BUILDERS.items():
        yield measure(build, "hf", name)


def packaged(rows: list[Row]) -> str:
    """The statuses as prisma_ext/data/parity.json holds them: {family: {name: [class, status]}}."""
    out: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        out.setdefault(row.family, {})[row.name] = [row.source, row.status]
    return json.dumps(out, indent=1, sort_keys=True) + "\n"


def summary(rows: list[Row]) -> dict[str, tuple[int, int]]:
    """{family: (reproduced, refused)}."""
    out: dict[str, tuple[int, int]] = {}
    for row in rows:
        done, refused = out.get(row.family, (0, 0))
        out[row.family] = (done + row.reproduced, refused + (not row.reproduced))
    return out


def error_matches(documented: str, measured: float | None) -> bool:
    """A documented error and a fresh one agree within a factor of ten (both below tolerance)."""
    if measured is None:
        return documented == ""
    if documented == "" or measured > TOLERANCE:
        return False
    value = float(documented)
    if value == 0.0 or measured == 0.0:
        return value < 1e-6 and measured < 1e-6
    return abs(math.log10(value) - math.log10(measured)) <= 1.0


# ---------------------------------------------------------------- the table in docs/architectures.md
START, END = "<!-- parity table: generated by scripts/parity.py -->", "<!-- end of parity table -->"
HEADER = ["family", "source class", "configuration", "status", "max error"]


def render(rows: list[Row]) -> str:
    """The generated section: counts per family, then one row per configuration."""
    counts = summary(rows)
    total = sum(done for done, _ in counts.values())
    lines = [START, "", f"{total} named configurations reproduced, "
             f"{sum(refused for _, refused in counts.values())} refused with the feature named:", "",
             "| family | reproduced | refused |", "| --- | --- | --- |"]
    lines += [f"| {family} | {done} | {refused} |" for family, (done, refused) in counts.items()]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines + ["", END])


def parse(markdown: str) -> list[list[str]]:
    """The configuration rows of the generated section of `markdown`, as cell lists."""
    section = markdown.split(START, 1)[1].split(END, 1)[0]
    rows, seen_header = [], False
    for line in section.splitlines():
        if not line.startswith("| "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells == HEADER:
            seen_header = True
        elif seen_header and set(cells) != {"---"}:
            rows.append(cells)
    return rows


def replace_section(markdown: str, section: str) -> str:
    head, rest = markdown.split(START, 1)
    return head + section + rest.split(END, 1)[1]
