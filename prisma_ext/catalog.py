"""What `px.load` takes, as text for `prisma-ext models`: the built-in models and, per source,
the named configurations the parity census reproduced or refused (prisma_ext/data/parity.json)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

PARITY = Path(__file__).resolve().parent / "data" / "parity.json"  # written by scripts/parity.py
FAMILIES = (("timm", "timm:NAME, or timm:NAME.TAG for a weight tag"),
            ("open_clip", "open_clip:ARCH or open_clip:ARCH/TAG"),
            ("hf", "hf:REPO or hf:FOLDER; the class is the config's architectures entry"))


def parity() -> dict[str, dict[str, list[str]]]:
    """{family: {name: [source class, status]}} from the last parity census (docs/architectures.md)."""
    return json.loads(PARITY.read_text())


def builtin_models() -> list[tuple[str, str]]:
    """(name, description) of the models that ship in the package (`prisma_ext.zoo`)."""
    from . import zoo

    out = []
    for name in zoo.MODELS:
        try:
            info = zoo.info(name)
        except (ValueError, OSError):
            continue  # not trained / not shipped in this checkout
        out.append((f"builtin:{name}", _describe(info)))
    return out


def _describe(info: dict) -> str:
    """One line from a zoo JSON: what it is, its classes, its measured accuracy."""
    classes = info.get("class_names") or []
    size = info.get("img_size")
    if info.get("library") == "open_clip":
        kind, accuracy = "open_clip CLIP", (info.get("zero_shot") or {}).get("shape_accuracy")
        measure = "zero-shot accuracy"
    else:
        kind, accuracy = "timm ViT classifier", (info.get("heldout") or {}).get("accuracy")
        measure = "held-out accuracy"
    parts = [f"{kind}, {size}x{size} scenes" if size else kind]
    if classes:
        parts.append(f"{len(classes)} classes ({', '.join(classes)})")
    if isinstance(accuracy, float):
        parts.append(f"{measure} {accuracy:.1%}")
    return "; ".join(parts)


def _wrap(names: list[str], width: int = 96, indent: str = "    ") -> Iterator[str]:
    line = indent
    for name in names:
        piece = name + ", "
        if len(line) + len(piece) > width and line.strip():
            yield line.rstrip(", ")
            line = indent
        line += piece
    if line.strip():
        yield line.rstrip(", ")


def models_text(full: bool = False) -> str:
    """The listing `prisma-ext models` prints: the built-in models, then per source how many named
    configurations the parity census reproduced, examples (`full`: every one), and the features
    it refused with how many configurations each."""
    lines = ["Built-in (px.load('builtin:NAME'); trained, ship in the package, offline):"]
    builtins = builtin_models()
    lines += [f"  {n:<24} {d}" for n, d in builtins] or ["  (none installed in this version)"]
    census = parity()
    for family, how in FAMILIES:
        rows = census.get(family, {})
        ok = [name for name, (_, status) in rows.items() if status == "reproduced"]
        lines += ["", f"{family} ({how}): {len(ok)} of {len(rows)} named configurations reproduced "
                      "(docs/architectures.md)"]
        lines += list(_wrap(ok)) if full else [f"  e.g. {', '.join(ok[:5])}, ... (--all lists them)"]
        refused: dict[str, int] = {}
        for _, status in rows.values():
            if status != "reproduced":
                feature = status.removeprefix("refused: ")
                refused[feature] = refused.get(feature, 0) + 1
        if refused:
            lines.append("  refused, with the feature named:")
            by_count = sorted(refused.items(), key=lambda kv: -kv[1])
            lines += [f"    {count:>3} x {feature}" for feature, count in by_count]
    lines += ["", "Your own ViT: px.register_adapter (docs/adapters.md).",
              "Weights: report uses the source's pretrained weights (--random-weights for random ones); "
              "inspect uses random weights unless --pretrained."]
    return "\n".join(lines)
