"""What a report is about: the model, the clean and corrupted images, the target class.

Image specs: a file path; `builtin:chelsea|astronaut|coffee` (scikit-image's photos);
`builtin:SHAPE` or `builtin:COLOUR-SHAPE` (a seeded scene from `prisma_ext.data.make_scenes`,
e.g. `builtin:circle`, `builtin:red-triangle`, `builtin:blue-7`). Corrupted specs add `blur`
(the clean image under a Gaussian blur, sigma one patch) and `auto`: for a scene, the same
scene with another object (same colour, size and place: a minimal pair); otherwise `blur`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError, UnknownNameError, suggest

BUILTIN = "builtin:"
SCENE_SEED = 3
CLIP_TEMPLATE = "a photo of a {}."


@dataclass
class ImageInput:
    """An image at the model's input size (HxWx3 uint8), what it is, and its object mask if known."""

    pixels: np.ndarray
    name: str
    mask: np.ndarray | None = None  # bool [H, W]: the object's pixels (scenes only)
    scene: tuple[str, str] | None = None  # (colour, object) for a scene


def _scene_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from ..data.scenes import COLOURS, DIGITS, SHAPES

    return SHAPES + DIGITS, tuple(COLOURS)


def _parse_scene(name: str) -> tuple[str, str] | None:
    """(colour, object) of a scene name like 'circle' or 'red-circle'; None if it is not one."""
    objects, colours = _scene_names()
    colour, _, obj = name.rpartition("-")
    if obj in objects and (not colour or colour in colours):
        return colour or "red", obj
    return None


def builtin_image_names() -> list[str]:
    """The names `builtin:NAME` takes (scenes listed by object; any palette colour may prefix)."""
    from ..data import SAMPLE_IMAGES

    objects, _ = _scene_names()
    return [*SAMPLE_IMAGES, *objects]


def _unknown_builtin(name: str, what: str) -> str:
    message = f"{what}: " + suggest(name, builtin_image_names(), "built-in image")
    if "closest:" not in message:
        message += f"; built-in images: {', '.join(builtin_image_names())}"
    return message + " (a scene may name a colour too, e.g. builtin:red-circle)"


def source_of(model: Any) -> str:
    """The source name a loaded model records ("builtin:shapes-clip", "timm:..."), or ""."""
    return str(getattr(model, "source", "") or getattr(getattr(model, "cfg", None), "source", ""))


def scene_options(source: str) -> dict[str, Any]:
    """How a built-in model's training scenes were drawn (noise, textures, scale ...), so that a
    report's scenes look like them; {} for other models."""
    if not source.startswith(BUILTIN):
        return {}
    from .. import zoo

    try:
        data = dict(zoo.info(source[len(BUILTIN):]).get("data", {}))
    except (ValueError, OSError):
        return {}
    return {k: v for k, v in data.items() if k not in ("n", "seed", "size", "classes", "colours")}


def scene_image(colour: str, obj: str, size: int, seed: int = SCENE_SEED, **options: Any) -> ImageInput:
    """One seeded scene at `size` pixels: the same seed puts any object at the same place.
    `options` go to `make_scenes` (e.g. a built-in model's `scene_options`)."""
    from ..data.scenes import make_scenes

    scenes = make_scenes(1, seed=seed, size=size, classes=[obj], colours=[colour], **options)
    pixels = (scenes.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return ImageInput(pixels, f"builtin:{colour}-{obj}", scenes.masks[0].numpy(), (colour, obj))


def fit_to_model(image: np.ndarray, cfg: Any) -> np.ndarray:
    """An HxWx3 uint8 image resized and centre-cropped as the model's preprocessing does."""
    from ..images import to_model_input

    return to_pixels(to_model_input(image, cfg), cfg)


def to_input(pixels: np.ndarray, cfg: Any):
    """HxWx3 uint8 pixels already at the model's size -> the normalised input [1, 3, H, W]."""
    import torch

    from ..images import normalize_pixels

    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)
    return normalize_pixels(x, cfg).unsqueeze(0).to(device=cfg.device, dtype=cfg.dtype)


def to_pixels(x, cfg: Any) -> np.ndarray:
    """A normalised model input [1, 3, H, W] back to HxWx3 uint8."""
    import torch

    mean = torch.tensor(cfg.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.std, dtype=torch.float32)[:, None, None]
    rgb = (x[0].detach().float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def check_spec(spec: str | None, what: str = "--image", extra: tuple[str, ...] = ()) -> None:
    """Fail fast, before any model loads: a file that is missing or not an image, an unknown
    builtin name. `extra`: special values allowed as they are (e.g. "auto", "blur")."""
    if spec is None or spec in extra:
        return
    if spec.startswith(BUILTIN):
        from ..data import SAMPLE_IMAGES

        name = spec[len(BUILTIN):]
        if name not in SAMPLE_IMAGES and _parse_scene(name) is None:
            raise UnknownNameError(_unknown_builtin(name, what))
        return
    from ..data import load_image

    load_image(spec)


def read_image(spec: str, cfg: Any, scene: dict[str, Any] | None = None) -> ImageInput:
    """An image spec (path or builtin:NAME) at the model's input size; `scene`: options for
    `make_scenes` when the spec names a scene."""
    if spec.startswith(BUILTIN):
        name = spec[len(BUILTIN):]
        from ..data import SAMPLE_IMAGES, sample_image

        if name in SAMPLE_IMAGES:
            return ImageInput(fit_to_model(sample_image(name), cfg), spec)
        parsed = _parse_scene(name)
        if parsed is None:
            raise UnknownNameError(_unknown_builtin(name, "--image"))
        if cfg.img_size[0] != cfg.img_size[1]:
            raise InputError(f"built-in scenes are square; this model takes {cfg.img_size[0]}x{cfg.img_size[1]}")
        return scene_image(*parsed, size=cfg.img_size[0], **(scene or {}))
    from ..data import load_image

    return ImageInput(fit_to_model(load_image(spec), cfg), spec)


def blurred(clean: ImageInput, patch: int) -> ImageInput:
    """The clean image under a Gaussian blur (sigma one patch): layout kept, detail gone."""
    from PIL import Image, ImageFilter

    img = Image.fromarray(clean.pixels).filter(ImageFilter.GaussianBlur(radius=patch))
    return ImageInput(np.asarray(img), f"{clean.name} blurred (sigma {patch} px)")


def corrupted_image(spec: str, clean: ImageInput, cfg: Any, foil: str | None,
                    scene: dict[str, Any] | None = None) -> ImageInput:
    """The corrupted image: `auto`, `blur`, a path or builtin:NAME (see the module docstring).
    `foil`: for `auto` on a scene, the object to put in the clean object's place."""
    if spec == "auto":
        if clean.scene is not None and foil is not None and _parse_scene(foil) is not None:
            return scene_image(clean.scene[0], foil, size=cfg.img_size[0], **(scene or {}))
        spec = "blur"
    if spec == "blur":
        return blurred(clean, max(cfg.patch_size))
    return read_image(spec, cfg, scene)


def class_index(model: Any, target: str) -> int:
    """The class index of `--target` (a class name or an index), checked against the model."""
    names = list(model.class_names or [])
    n = _n_classes(model)
    if target.lstrip("-").isdigit() and target not in names:
        index = int(target)
        if not 0 <= index < n:
            raise InputError(f"--target {index} is out of range: the model has {n} classes (0 to {n - 1})")
        return index
    if target in names:
        return names.index(target)
    if not names:
        raise InputError(f"--target {target!r}: this model has no class names; give a class index 0 to {n - 1}")
    hint = suggest(target, names, "class").removeprefix("unknown class ")
    return _raise_unknown_class(hint, names)


def _raise_unknown_class(hint: str, names: list[str]) -> int:
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    if "; closest:" in hint:
        raise UnknownNameError(f"unknown class {hint}")
    raise UnknownNameError(f"unknown class {hint}; classes: {shown}")


def _n_classes(model: Any) -> int:
    from ..analysis.backend import Backend

    return Backend.of(model).cfg.n_classes


def is_clip(model: Any) -> bool:
    return hasattr(model, "use_zero_shot_head")


def zero_shot_classes(source: str) -> tuple[list[str], list[str]]:
    """The class list and prompt templates for a CLIP model's zero-shot head: for a built-in
    model, the classes and templates its zero-shot accuracy was measured with; else open_clip's
    1000 ImageNet class names with one template ("a photo of a {}.")."""
    if source.startswith(BUILTIN):
        from .. import zoo

        info = zoo.info(source[len(BUILTIN):])
        return list(info["class_names"]), list(info["zero_shot"]["templates"])
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES), [CLIP_TEMPLATE]
