"""Batching image invokes: several `tracer.invoke(images)` in one trace run as one forward pass.

nnsight asks the model how many rows an invoke's input contributes (`_batch_size`) and how to
combine the invokes' inputs into one call (`_batch`); it then serves each invoke its own rows of
every activation (dim 0). Images are [batch, channels, height, width] tensors, so rows are
images and combining is a concatenation along dim 0.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import InputError

IMAGE_KEYS = ("x", "images", "pixel_values")


def images_of(args: tuple, kwargs: dict) -> Tensor | None:
    """The images of one invoke: the first positional argument or an images keyword."""
    if args:
        return args[0]
    for key in IMAGE_KEYS:
        if key in kwargs:
            return kwargs[key]
    return None


def image_rows(args: tuple, kwargs: dict, check=None) -> int:
    """How many images an invoke adds (0 for an empty invoke). `check(images)` validates them."""
    images = images_of(args, kwargs)
    if images is None:
        if kwargs:
            raise InputError(f"an invoke needs images [batch, channels, H, W]; got only keyword "
                             f"arguments {sorted(kwargs)}")
        return 0
    if not isinstance(images, Tensor):
        raise InputError(f"expected images as a torch.Tensor [batch, channels, H, W], got "
                         f"{type(images).__name__}")
    if check is not None:
        check(images)
    return int(images.shape[0])


def concat_invokes(invokes: list[tuple[tuple, dict]]) -> tuple[tuple, dict]:
    """One forward call's (args, kwargs) from several invokes' (args, kwargs): the images
    concatenated along dim 0, in invoke order. All invokes must share the image shape, dtype and
    device and pass nothing else."""
    import torch

    if not invokes:
        return (), {}
    if len(invokes) == 1:
        return invokes[0]
    images: list[Any] = []
    for i, (args, kwargs) in enumerate(invokes):
        extra = sorted(set(kwargs) - set(IMAGE_KEYS)) + (["positional"] if len(args) > 1 else [])
        if extra:
            raise InputError(f"invoke {i} passes more than images ({', '.join(extra)}); batched "
                             "invokes take only an images tensor each")
        images.append(images_of(args, kwargs))
    first = images[0]
    for i, t in enumerate(images[1:], 1):
        if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype or t.device != first.device:
            raise InputError(
                f"invokes in one trace run as one batch, so their images must match: invoke 0 has "
                f"{tuple(first.shape)} {first.dtype} on {first.device}, invoke {i} has "
                f"{tuple(t.shape)} {t.dtype} on {t.device} (only the batch size may differ)")
    return (torch.cat(images, dim=0),), {}
