"""Sample images: scikit-image's bundled photos, and a loader for image files.

Both return an ``H x W x 3`` ``uint8`` numpy array (RGB), the format that
``HookedViT.preprocess`` takes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

# name -> function name in ``skimage.data``; all three ship inside the scikit-image wheel.
SAMPLE_IMAGES: tuple[str, ...] = ("chelsea", "astronaut", "coffee")


def _error(message: str) -> ValueError:
    """A ``PrismaError`` when the core defines it, else a plain ``ValueError``."""
    try:
        from prisma_ext.errors import PrismaError
    except ImportError:  # the core is not there yet: PrismaError subclasses ValueError anyway
        return ValueError(message)
    return PrismaError(message)


def _to_rgb_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    import numpy as np

    arr = np.asarray(arr)
    if arr.ndim == 2:  # greyscale
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise _error(f"{what}: expected an H x W x 3 RGB image, got an array of shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def sample_image(name: str = "chelsea") -> np.ndarray:
    """One of scikit-image's bundled photos as an ``H x W x 3`` ``uint8`` RGB array.

    ``name`` is one of ``"chelsea"`` (a cat, 300 x 451), ``"astronaut"`` (512 x 512) or
    ``"coffee"`` (a cup of coffee, 400 x 600). Needs scikit-image (the ``dev`` extra).
    """
    if name not in SAMPLE_IMAGES:
        raise _error(f"unknown sample image {name!r}: expected one of {', '.join(SAMPLE_IMAGES)}")
    try:
        from skimage import data as skdata
    except ImportError as exc:
        raise _error(
            f"sample image {name!r} needs scikit-image, which is not installed: "
            "run `pip install scikit-image` (or `pip install 'prisma-ext[dev]'`), "
            "or pass an image file instead"
        ) from exc
    return _to_rgb_uint8(getattr(skdata, name)(), f"sample image {name!r}")


def _to_rgb(im):
    """A PIL image as 8-bit RGB. 16- and 32-bit greyscale (modes I;16*, I, F) are scaled to 0-255 by
    their bit depth (PIL's own convert("RGB") clips them, turning most 16-bit images white)."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or (mode == "I" and values.max() > 255) else 255.0
        if mode == "F":
            top = 1.0 if values.max() <= 1.0 else 255.0
        grey = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return im.convert("RGB")


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file (any format Pillow reads) as an ``H x W x 3`` ``uint8`` RGB array.

    Greyscale, palette and RGBA images are converted to RGB (alpha is dropped); 16-bit greyscale
    is scaled by its bit depth, not clipped. A missing
    path, a directory, or a file that is not an image raises a ``ValueError``
    (``prisma_ext.errors.PrismaError``) that names the path.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise _error(f"image file not found: {path!r}")
    if os.path.isdir(path):
        raise _error(f"expected an image file, got a directory: {path!r}")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = _to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _error(
            f"not a readable image file: {path!r} ({type(exc).__name__}: {exc}); "
            "expected a PNG, JPEG or other format Pillow reads"
        ) from exc
    return _to_rgb_uint8(np.asarray(rgb), f"image {path!r}")
