"""What a method explains: one scalar per image, computed from the model's output.

    target=None                  the predicted class of each image
    target=3 / "tabby"           one class for every image
    target=[3, 5] (or a tensor)  one class per image
    target=LogitDiff(3, 5)       logit of class 3 minus logit of class 5 (each may be per image)
    target=ImageTextScore(texts) CLIP: exp(logit_scale) * cos(image, text) (+ logit_bias), one
                                 prompt for every image or one per image (HookedCLIP only)
    target=fn                    any fn(output [batch, ...]) -> [batch] (not for the methods that
                                 need a linear readout: logit lens, direct logit attribution)

A target is *bound* to a batch before use (`bind`): the predicted class is chosen, names become
indices, per-image lists are checked against the batch. A bound target gives a `table` of
scores [batch, K] and `columns` [batch] (image i's score is `table[i, columns[i]]`), the form
Captum's `target=` argument takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, PrismaError
from .backend import Backend


class Target:
    """Base class. `sites`: sites whose values `table` reads (e.g. CLIP's image embedding)."""

    sites: tuple[str, ...] = ()
    linear: bool = True
    columns: Tensor | None = None

    @property
    def bound(self) -> bool:
        return self.columns is not None

    def bind(self, backend: Backend, output: Tensor, batch: int) -> Target:
        """A copy for a batch of `batch` images whose model output is `output`."""
        raise NotImplementedError

    def table(self, output: Tensor, acts: Mapping[str, Tensor]) -> Tensor:
        """Scores [n, K] of each output row; row i's own score is column `columns[i]`."""
        raise NotImplementedError

    def score(self, output: Tensor, acts: Mapping[str, Tensor], rows: Tensor | None = None) -> Tensor:
        """Each image's score [n]. `rows`: the image index of each output row (for outputs of
        perturbed copies of the batch); default: row i is image i."""
        if not self.bound:
            raise PrismaError("internal: target used before bind()")
        cols = self.columns if rows is None else self.columns[rows]
        table = self.table(output, acts)
        return table.gather(1, cols.to(table.device)[:, None])[:, 0]

    def readout(self, backend: Backend, acts: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The score as a linear readout of the final residual stream, the final norm's scale
        frozen: (directions [batch, pos, d_model], constant [batch]) with
        `score = sum_pos centred(resid[pos]) / scale[pos] . directions[pos] + constant`."""
        raise PrismaError(f"{self.describe()} is not a linear readout of the residual stream; "
                          "use a class, a LogitDiff or an ImageTextScore")

    def describe(self) -> str:
        return type(self).__name__

    def is_class(self) -> bool:
        return False


def _check_head(backend: Backend) -> None:
    if backend.vit.head is None:
        raise PrismaError("this model has no classifier head, so classes mean nothing: for CLIP call "
                          "clip.use_zero_shot_head(class_names) first, or explain an "
                          "ImageTextScore(texts)")


def _one_class(vit, cls: Any, what: str) -> int:
    if isinstance(cls, Tensor) and cls.numel() == 1:
        cls = cls.item()
    if isinstance(cls, Integral):
        return vit.to_single_token(int(cls))
    if isinstance(cls, str):
        return vit.to_single_token(cls)
    raise InputError(f"{what}: expected a class index or name, got {cls!r}")


def _class_ids(backend: Backend, classes: Any, batch: int, what: str) -> Tensor:
    """Class indices [batch] from a name, an index, or one per image."""
    vit = backend.vit
    if isinstance(classes, (str, Integral)) or (isinstance(classes, Tensor) and classes.ndim == 0):
        return torch.full((batch,), _one_class(vit, classes, what), dtype=torch.long)
    if isinstance(classes, Tensor):
        ids = classes.long().flatten().cpu()
    elif isinstance(classes, Sequence):
        ids = torch.tensor([_one_class(vit, c, what) for c in classes], dtype=torch.long)
    else:
        raise InputError(f"{what}: expected a class index or name, or one per image, got {type(classes).__name__}")
    if ids.numel() != batch:
        raise InputError(f"{what}: {ids.numel()} classes for {batch} images (give one, or one per image)")
    n = vit.cfg.n_classes
    if ids.numel() and (ids.min() < 0 or ids.max() >= n):
        raise InputError(f"{what}: class indices must be in [0, {n}), got {ids.tolist()}")
    return ids


class ClassTarget(Target):
    """The logit of a class: `classes` None (predicted), one class, or one per image."""

    def __init__(self, classes: Any = None):
        self.classes = classes
        self.ids: Tensor | None = None

    def bind(self, backend, output, batch):
        if self.bound:
            return self
        _check_head(backend)
        bound = ClassTarget(self.classes)
        if self.classes is None:
            bound.ids = output.detach().argmax(-1).cpu().long()
        else:
            bound.ids = _class_ids(backend, self.classes, batch, "target")
        bound.columns = bound.ids
        return bound

    def table(self, output, acts):
        return output

    def readout(self, backend, acts):
        from .readout import class_readout

        return class_readout(backend.vit, self.ids)

    def describe(self):
        return "predicted class" if self.classes is None else f"class {self.classes}"

    def is_class(self) -> bool:
        return True


class LogitDiff(Target):
    """logit(a) - logit(b); each of `a`, `b` one class (index or name) or one per image."""

    def __init__(self, a: Any, b: Any):
        self.a, self.b = a, b
        self.ids_a: Tensor | None = None
        self.ids_b: Tensor | None = None

    def bind(self, backend, output, batch):
        if self.bound:
            return self
        _check_head(backend)
        bound = LogitDiff(self.a, self.b)
        bound.ids_a = _class_ids(backend, self.a, batch, "LogitDiff a")
        bound.ids_b = _class_ids(backend, self.b, batch, "LogitDiff b")
        bound.columns = torch.arange(batch)
        return bound

    def table(self, output, acts):
        return output[:, self.ids_a.to(output.device)] - output[:, self.ids_b.to(output.device)]

    def readout(self, backend, acts):
        from .readout import class_readout

        d_a, c_a = class_readout(backend.vit, self.ids_a)
        d_b, c_b = class_readout(backend.vit, self.ids_b)
        return d_a - d_b, c_a - c_b

    def describe(self):
        return f"logit difference {self.a} - {self.b}"


class ImageTextScore(Target):
    """CLIP's logit of an image with a prompt: exp(logit_scale) * cos(image_embed, text_embed)
    (+ logit_bias). `texts`: prompts (or token ids), one for every image or one per image."""

    sites = ("hook_image_embed",)

    def __init__(self, texts: Sequence[str] | Tensor):
        self.texts = texts
        self.text_embeds: Tensor | None = None
        self.scale: Tensor | None = None
        self.bias: Tensor | None = None

    def bind(self, backend, output, batch):
        if self.bound:
            return self
        from ..hooked.clip import HookedCLIP

        clip = backend.model
        if not isinstance(clip, HookedCLIP):
            raise PrismaError(f"ImageTextScore needs a CLIP model (px.load of an open_clip or Hugging Face "
                              f"CLIP), got {type(clip).__name__}")
        n = len(self.texts)
        if n not in (1, batch):
            raise InputError(f"ImageTextScore: {n} prompts for {batch} images (give one, or one per image)")
        bound = ImageTextScore(self.texts)
        with torch.no_grad():
            bound.text_embeds = clip.encode_text(self.texts, normalize=True).detach()
            bound.scale = clip.logit_scale.detach().exp()
            bound.bias = clip.logit_bias.detach() if clip.logit_bias is not None else None
        bound.columns = torch.zeros(batch, dtype=torch.long) if n == 1 else torch.arange(batch)
        return bound

    def _embed(self, acts: Mapping[str, Tensor]) -> Tensor:
        if "hook_image_embed" not in acts:
            raise PrismaError("internal: ImageTextScore needs the image embedding (site hook_image_embed)")
        return acts["hook_image_embed"]

    def table(self, output, acts):
        image = torch.nn.functional.normalize(self._embed(acts), dim=-1)
        table = self.scale * image @ self.text_embeds.T.to(image.device)
        return table + self.bias if self.bias is not None else table

    def readout(self, backend, acts):
        """With the image embedding's norm frozen too, the score is linear in the embedding."""
        from .readout import pooled_functional_readout

        vit = backend.vit
        embed = self._embed(acts)
        texts = self.text_embeds.to(embed.device)[self.columns.to(embed.device)]
        v = self.scale * texts / embed.norm(dim=-1, keepdim=True)  # [batch, d_proj]
        u = v @ vit.proj.weight  # [batch, d_model]
        const = v @ vit.proj.bias
        if self.bias is not None:
            const = const + self.bias
        return pooled_functional_readout(vit, u, const)

    def describe(self):
        return "image-text score"


class FunctionTarget(Target):
    """Any fn(output) -> [batch]; not linear in the residual stream."""

    linear = False

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn = fn

    def bind(self, backend, output, batch):
        if self.bound:
            return self
        bound = FunctionTarget(self.fn)
        bound.columns = torch.zeros(batch, dtype=torch.long)
        return bound

    def table(self, output, acts):
        value = self.fn(output)
        if not isinstance(value, Tensor) or value.shape != output.shape[:1]:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise InputError(f"a target function must return one score per image, shape "
                             f"[{output.shape[0]}], got {shape}")
        return value[:, None]

    def describe(self):
        return getattr(self.fn, "__name__", "function")


def as_target(target: Any) -> Target:
    """A `Target` from what a user passes (see the module docstring)."""
    if isinstance(target, Target):
        return target
    if target is None or isinstance(target, (Integral, str, Tensor, Sequence)):
        return ClassTarget(target)
    if callable(target):
        return FunctionTarget(target)
    raise InputError(f"target: expected a class (index or name), one per image, LogitDiff(a, b), "
                     f"ImageTextScore(texts) or a function of the output, got {type(target).__name__}")


def bind(backend: Backend, images: Tensor, target: Any, output: Tensor | None = None) -> Target:
    """`target` bound to `images`. `output`: the model's output on `images` where the caller has
    it; otherwise the model runs once when it must predict the class."""
    target = as_target(target)
    if target.bound:
        return target
    if output is None and isinstance(target, ClassTarget) and target.classes is None:
        with torch.no_grad():
            output = backend.run(images).output
    return target.bind(backend, images[:0] if output is None else output, images.shape[0])
