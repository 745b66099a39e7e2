"""What a method explains: one score per image, computed from the model's output. Every method
takes it as `target=`, patching included (there it is the metric each patched run is scored by).

    target=None                   the predicted class of each image (its logit)
    target=3 / "tabby"            that class's logit, for every image
    target=[3, 5] (or a tensor)   one class per image
    target=ClassProb(c)           the softmax probability of class c (c as above)
    target=LogitDiff(3, 5)        logit of class 3 minus logit of class 5 (each may be per image)
    target=ImageTextScore(texts)  CLIP: exp(logit_scale) * cos(image, text) (+ logit_bias), one
                                  prompt for every image or one per image; `versus=` for the
                                  difference with other prompts
    target=fn                     any fn(output [n, ...]) -> [n]; FunctionTarget(fn, per_image=True)
                                  for fn(output, images) where images[i] is row i's image index

A target is *bound* once to the images it explains (`bind`): the predicted class is chosen,
names become indices, per-image lists are checked against the batch, prompts are encoded. A
bound target scores an output for given rows (`score(output, acts, rows)`: row i belongs to
image rows[i], as in a patching sweep's batched runs), and gives a `table` of scores [n, K] with
`columns` [batch] (image i's score is `table[i, columns[i]]`), the form Captum's `target=` takes.
Linear targets (a class, a LogitDiff, an ImageTextScore) are also readouts of the residual
stream (`readout`), which direct logit attribution splits.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, PrismaError
from .backend import Backend

ACCEPTED = ("a function fn(output) -> [n], a class index or name, one class per image, None (the predicted "
            "class), px.ClassProb(c), px.LogitDiff(a, b) or px.ImageTextScore(texts) on a CLIP model")


class Target:
    """Base class. `sites`: sites whose values `table` reads besides the output (e.g. CLIP's
    image embedding); `linear`: whether the score is a linear readout of the residual stream."""

    sites: tuple[str, ...] = ()
    linear: bool = True
    columns: Tensor | None = None

    @property
    def bound(self) -> bool:
        return self.columns is not None

    def bind(self, backend: Backend, output: Tensor, batch: int) -> Target:
        """A copy for a batch of `batch` images whose model output is `output` (bound targets
        return themselves)."""
        raise NotImplementedError

    def table(self, output: Tensor, acts: Mapping[str, Tensor]) -> Tensor:
        """Scores [n, K] of each output row; row i's own score is column `columns[i]`."""
        raise NotImplementedError

    def score(self, output: Tensor, acts: Mapping[str, Tensor], rows: Tensor | None = None) -> Tensor:
        """Each row's score [n]. `rows`: the image index of each output row (for outputs of
        perturbed or patched copies of the batch); default: row i is image i."""
        if not self.bound:
            raise PrismaError("internal: target used before bind()")
        cols = self.columns if rows is None else self.columns[rows.cpu()]
        table = self.table(output, acts)
        return table.gather(1, cols.to(table.device)[:, None])[:, 0]

    def select(self, rows: Tensor) -> Target:
        """The bound target of a subset of its images (`rows`, in the new batch's order)."""
        if not self.bound:
            raise PrismaError("internal: select() on an unbound target")
        picked = copy.copy(self)
        picked.columns = self._select_columns(rows)
        return picked

    def _select_columns(self, rows: Tensor) -> Tensor:
        return self.columns[rows]

    def readout(self, backend: Backend, acts: Mapping[str, Tensor], n_tokens: int) -> tuple[Tensor, Tensor]:
        """The score as a linear readout of the final residual stream, the final norm's scale
        frozen: (directions [batch, pos, d_model], constant [batch]) with
        `score = sum_pos centred(resid[pos]) / scale[pos] . directions[pos] + constant`."""
        raise PrismaError(f"{self.describe()} is not a linear readout of the residual stream; "
                          "use a class, a LogitDiff or an ImageTextScore")

    def describe(self) -> str:
        return type(self).__name__

    def is_class(self) -> bool:
        """Whether the score reads one class of a classifier head (so top-1 hits mean something)."""
        return False


# ------------------------------------------------------------------------------- classes


def _check_head(backend: Backend) -> None:
    if backend.vit.head is None:
        raise PrismaError("this model has no classifier head, so classes mean nothing: for CLIP call "
                          "clip.use_zero_shot_head(class_names) first, or explain an "
                          "ImageTextScore(texts)")


def _one_class(vit, cls: Any, what: str) -> int:
    if isinstance(cls, Tensor) and cls.numel() == 1:
        cls = cls.item()
    if isinstance(cls, bool):
        raise InputError(f"{what}: expected a class index or name, got {cls!r} (a bool)")
    if isinstance(cls, Integral):
        n = vit.cfg.n_classes
        if not 0 <= int(cls) < n:
            raise InputError(f"{what}: class index {int(cls)} is out of range: the model has {n} classes "
                             f"(0 to {n - 1})")
        return int(cls)
    if isinstance(cls, str):
        return vit.to_single_token(cls)
    raise InputError(f"{what}: expected a class index or name, got {cls!r}")


def class_ids(backend: Backend, classes: Any, batch: int, what: str) -> Tensor:
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
    """The logit of a class: `classes` None (each image's predicted class), one class (index or
    name), or one per image."""

    def __init__(self, classes: Any = None):
        self.classes = classes
        self.ids: Tensor | None = None

    def bind(self, backend, output, batch):
        if self.bound:
            return self
        _check_head(backend)
        bound = type(self)(self.classes)
        if self.classes is None:
            bound.ids = output.detach().argmax(-1).cpu().long()
        else:
            bound.ids = class_ids(backend, self.classes, batch, "target")
        bound.columns = bound.ids
        return bound

    def select(self, rows):
        picked = super().select(rows)
        picked.ids = self.ids[rows]
        return picked

    def table(self, output, acts):
        return output

    def readout(self, backend, acts, n_tokens):
        return backend.readout.class_directions(self.ids, n_tokens)

    def describe(self):
        return "predicted class" if self.classes is None else f"class {self.classes}"

    def is_class(self) -> bool:
        return True


class ClassProb(ClassTarget):
    """The softmax probability of a class (`classes` as for `ClassTarget`). Not linear in the
    residual stream, so direct logit attribution refuses it."""

    linear = False

    def table(self, output, acts):
        return output.softmax(-1)

    def readout(self, backend, acts, n_tokens):
        return Target.readout(self, backend, acts, n_tokens)

    def describe(self):
        return "probability of the predicted class" if self.classes is None else f"probability of class {self.classes}"


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
        bound.ids_a = class_ids(backend, self.a, batch, "LogitDiff a")
        bound.ids_b = class_ids(backend, self.b, batch, "LogitDiff b")
        bound.columns = torch.arange(batch)
        return bound

    def select(self, rows):
        picked = super().select(rows)
        picked.ids_a, picked.ids_b = self.ids_a[rows], self.ids_b[rows]
        return picked

    def _select_columns(self, rows):
        return torch.arange(len(rows))

    def table(self, output, acts):
        return output[:, self.ids_a.to(output.device)] - output[:, self.ids_b.to(output.device)]

    def readout(self, backend, acts, n_tokens):
        d_a, c_a = backend.readout.class_directions(self.ids_a, n_tokens)
        d_b, c_b = backend.readout.class_directions(self.ids_b, n_tokens)
        return d_a - d_b, c_a - c_b

    def describe(self):
        return f"logit difference {self.a} - {self.b}"


# ------------------------------------------------------------------------------- CLIP


def _texts(texts: Any, what: str) -> Sequence[str] | Tensor:
    """Prompts as a list (one string is one prompt), token ids, or text embeddings."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, Tensor):
        if texts.ndim != 2 or texts.shape[0] == 0:
            raise InputError(f"{what}: expected token ids or text embeddings [n, ...], got {tuple(texts.shape)}")
        return texts
    if isinstance(texts, Sequence) and texts and all(isinstance(t, str) for t in texts):
        return list(texts)
    raise InputError(f"{what}: expected prompts (a string or a non-empty list of strings), token ids or text "
                     f"embeddings, got {texts!r}")


def is_clip_model(model: Any) -> bool:
    """A HookedCLIP, or a TracedCLIP with a text tower (a module not imported: not one)."""
    hooked, traced = sys.modules.get("prisma_ext.hooked.clip"), sys.modules.get("prisma_ext.traced.clip")
    if hooked is not None and isinstance(model, hooked.HookedCLIP):
        return True
    return traced is not None and isinstance(model, traced.TracedCLIP) and model.text_cfg is not None


def _encode(clip, texts: Sequence[str] | Tensor) -> Tensor:
    """Normalised text embeddings [n, d_proj]: prompts and token ids through the text tower."""
    if isinstance(texts, Tensor) and texts.is_floating_point():
        return torch.nn.functional.normalize(texts.detach(), dim=-1)
    with torch.no_grad():
        return clip.encode_text(texts, normalize=True).detach()


class ImageTextScore(Target):
    """CLIP's logit of an image with a prompt: exp(logit_scale) * cos(image_embed, text_embed)
    (+ logit_bias). `texts`: prompts (or token ids, or text embeddings), one for every image or
    one per image. `versus`: other prompts (one, or as many as `texts`): the score is then the
    difference of the two logits. `scale`: a number to use instead of exp(logit_scale) (the
    logit bias is then left out)."""

    sites = ("hook_image_embed",)

    def __init__(self, texts: Sequence[str] | Tensor, versus: Sequence[str] | Tensor | None = None,
                 scale: float | None = None):
        self.texts = _texts(texts, "ImageTextScore")
        self.versus = _texts(versus, "ImageTextScore versus") if versus is not None else None
        self.scale_given = scale
        self.text_embeds: Tensor | None = None
        self.scale: Tensor | float | None = None
        self.bias: Tensor | None = None

    def bind(self, backend, output, batch):
        if self.bound:
            return self
        clip = backend.model
        if not is_clip_model(clip):
            raise PrismaError(f"ImageTextScore needs a CLIP model (px.load of an open_clip or Hugging Face "
                              f"CLIP, either backend), got {type(clip).__name__}")
        n = len(self.texts)
        if n not in (1, batch):
            raise InputError(f"ImageTextScore: {n} prompts for {batch} images (give one, or one per image)")
        bound = ImageTextScore(self.texts, self.versus, self.scale_given)
        embeds = _encode(clip, self.texts)
        if self.versus is not None:
            other = _encode(clip, self.versus)
            if len(other) not in (1, n):
                raise InputError(f"ImageTextScore: {len(other)} versus prompts for {n} prompts (give one, or "
                                 "one per prompt)")
            embeds = embeds - other.expand_as(embeds)
        bound.text_embeds = embeds
        if self.scale_given is None:
            bound.scale = clip.logit_scale.detach().exp()
            if self.versus is None and clip.logit_bias is not None:
                bound.bias = clip.logit_bias.detach()
        else:
            bound.scale = float(self.scale_given)
        bound.columns = torch.zeros(batch, dtype=torch.long) if n == 1 else torch.arange(batch)
        return bound

    def select(self, rows):
        picked = super().select(rows)
        if self.text_embeds.shape[0] > 1:  # one prompt per image
            picked.text_embeds = self.text_embeds[rows.to(self.text_embeds.device)]
            picked.columns = torch.arange(len(rows))
        return picked

    def _embed(self, acts: Mapping[str, Tensor]) -> Tensor:
        if "hook_image_embed" not in acts:
            raise PrismaError("internal: ImageTextScore needs the image embedding (site hook_image_embed)")
        return acts["hook_image_embed"]

    def table(self, output, acts):
        image = torch.nn.functional.normalize(self._embed(acts), dim=-1)
        table = self.scale * image @ self.text_embeds.T.to(image.device)
        return table + self.bias if self.bias is not None else table

    def readout(self, backend, acts, n_tokens):
        """With the image embedding's norm frozen too, the score is linear in the embedding."""
        vit = backend.vit
        embed = self._embed(acts)
        texts = self.text_embeds.to(embed.device)[self.columns.to(embed.device)]
        v = self.scale * texts / embed.norm(dim=-1, keepdim=True)  # [batch, d_proj]
        u = v @ vit.proj.weight  # [batch, d_model]
        const = v @ vit.proj.bias
        if self.bias is not None:
            const = const + self.bias
        return backend.readout.spread(u, const, n_tokens)

    def describe(self):
        return "image-text score" + (" difference" if self.versus is not None else "")


# ------------------------------------------------------------------------------- functions


class FunctionTarget(Target):
    """Any fn(output) -> [n] (one score per row); with `per_image=True`, fn(output, images) where
    images [n] is each row's image index (for a score that depends on the image, e.g. its label).
    Not linear in the residual stream."""

    linear = False

    def __init__(self, fn: Callable[..., Tensor], per_image: bool = False):
        if not callable(fn):
            raise InputError(f"FunctionTarget: expected a function, got {type(fn).__name__}")
        self.fn, self.per_image = fn, per_image
        self.image_ids: Tensor | None = None  # after select(): each image's index in the bound batch

    def bind(self, backend, output, batch):
        if self.bound:
            return self
        bound = FunctionTarget(self.fn, self.per_image)
        bound.columns = torch.zeros(batch, dtype=torch.long)
        return bound

    def select(self, rows):
        picked = super().select(rows)
        picked.image_ids = rows if self.image_ids is None else self.image_ids[rows]
        return picked

    def _call(self, output: Tensor, rows: Tensor) -> Tensor:
        if self.image_ids is not None:
            rows = self.image_ids[rows.cpu()]
        try:
            value = self.fn(output, rows.to(output.device)) if self.per_image else self.fn(output)
        except TypeError as err:
            form = "fn(output, images)" if self.per_image else "fn(output)"
            hint = "" if self.per_image else (
                "; for a function of (output, image index of each row) pass "
                "px.FunctionTarget(fn, per_image=True)")
            raise InputError(f"a target function is called as {form} and raised TypeError: {err}{hint}") from err
        if not isinstance(value, Tensor) or tuple(value.shape) != (output.shape[0],):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise InputError(f"a target function must return one score per image (one number per example), shape "
                             f"({output.shape[0]},); got {shape}")
        return value

    def score(self, output, acts, rows=None):
        if not self.bound:
            raise PrismaError("internal: target used before bind()")
        rows = torch.arange(output.shape[0]) if rows is None else rows
        return self._call(output, rows)

    def table(self, output, acts):
        if self.per_image:
            raise InputError("a per-image target function scores rows whose image it is told; this method "
                             "(Captum's attributions) expands the batch itself: use fn(output) -> [n]")
        return self._call(output, torch.arange(output.shape[0]))[:, None]

    def describe(self):
        return getattr(self.fn, "__name__", "function")


# ------------------------------------------------------------------------------- from what users pass


def as_target(target: Any, what: str = "target") -> Target:
    """A `Target` from what a user passes (see the module docstring)."""
    if isinstance(target, Target):
        return target
    if isinstance(target, bool):
        raise InputError(f"{what}: expected {ACCEPTED}; got {target!r} (a bool)")
    if target is None or isinstance(target, (Integral, str, Tensor)):
        return ClassTarget(target)
    if isinstance(target, Sequence) and not isinstance(target, (bytes, bytearray)):
        return ClassTarget(target)
    if callable(target):
        return FunctionTarget(target)
    raise InputError(f"{what}: expected {ACCEPTED}; got {type(target).__name__}")


def bind(backend: Backend, images: Tensor, target: Any, output: Tensor | None = None,
         what: str = "target") -> Target:
    """`target` bound to `images`. `output`: the model's output on `images` where the caller has
    it; otherwise the model runs once when it must predict the class."""
    target = as_target(target, what)
    if target.bound:
        return target
    if output is None and isinstance(target, ClassTarget) and target.classes is None:
        output = backend.output(images)
    return target.bind(backend, images[:0] if output is None else output, images.shape[0])
