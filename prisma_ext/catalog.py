"""What `px.load` takes, as text for `prisma-ext models`: built-in models, timm ViT variants,
open_clip configs with their own towers, Hugging Face CLIP."""

from __future__ import annotations

from collections.abc import Iterator

TIMM_VARIANTS = (
    ("plain ViT (CLS token)", "vit_base_patch16_224, vit_small_patch16_224, vit_tiny_patch16_224"),
    ("DeiT, DeiT distilled (CLS + distillation token)", "deit_small_patch16_224, deit_base_distilled_patch16_224"),
    ("DINOv2 with registers", "vit_small_patch14_reg4_dinov2"),
    ("CLIP-style (norm_pre, QuickGELU)", "vit_base_patch32_clip_224, vit_base_patch16_clip_quickgelu_224"),
    ("average pool, no CLS", "vit_base_patch16_gap_224"),
    ("SigLIP (attention-pool head)", "vit_base_patch16_siglip_224"),
)
TIMM_REFUSED = ("EVA (rotary positions), Swin, BEiT, NaFlex, SAM, Hiera, MaxViT; inside VisionTransformer: "
                "qk_norm, SwiGLU, RMSNorm, avgmax/max pooling, hybrid CNN stems")
OPEN_CLIP_REFUSED = {"coca_base", "coca_ViT-B-32", "coca_ViT-L-14"}


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


def open_clip_own_towers() -> list[str]:
    """open_clip configs with open_clip's own ViT visual tower and text tower."""
    import open_clip
    from open_clip.factory import get_model_config

    names = []
    for name in open_clip.list_models():
        cfg = get_model_config(name) or {}
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)):
            continue
        if text.get("hf_model_name"):
            continue
        names.append(name)
    return names


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
    """The listing `prisma-ext models` prints; `full` lists every timm and open_clip name."""
    from .sources.timm import supported_timm_names

    lines = ["Built-in (px.load('builtin:NAME'); trained, ship in the package, offline):"]
    builtins = builtin_models()
    lines += [f"  {n:<24} {d}" for n, d in builtins] or ["  (none installed in this version)"]
    timm_names = supported_timm_names()
    lines += ["", f"timm (timm:NAME, or timm:NAME.TAG for a weight tag; {len(timm_names)} names in timm's "
                  "vision_transformer and deit modules):"]
    lines += [f"  {kind:<48} e.g. {examples}" for kind, examples in TIMM_VARIANTS]
    lines += ["  any of these with dynamic_img_size=True takes other image sizes",
              f"  refused, with the feature named: {TIMM_REFUSED}"]
    if full:
        lines += list(_wrap(timm_names))
    own = open_clip_own_towers()
    ok = [n for n in own if n not in OPEN_CLIP_REFUSED]
    lines += ["", f"open_clip (open_clip:ARCH or open_clip:ARCH/TAG): {len(ok)} of the {len(own)} configs with "
                  "open_clip's own ViT and text towers are reproduced; CoCa "
                  f"({', '.join(sorted(OPEN_CLIP_REFUSED & set(own)))}) is refused;",
              "  configs with a timm trunk, a ResNet or a Hugging Face text encoder are not supported"]
    lines += list(_wrap(ok)) if full else [f"  e.g. {', '.join(ok[:6])}, ... (--all lists them)"]
    lines += ["", "Hugging Face (hf:REPO or hf:FOLDER): CLIPModel (both towers, HookedCLIP) and "
                  "CLIPVisionModel (HookedViT)",
              "  e.g. hf:openai/clip-vit-base-patch32",
              "", "Your own ViT: px.register_adapter (docs/adapters.md).",
              "Weights: report uses the source's pretrained weights (--random-weights for random ones); "
              "inspect uses random weights unless --pretrained."]
    return "\n".join(lines)
