"""Patch logit lens: every token of every layer read out through the final norm and head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, PrismaError
from .backend import Backend
from .common import check_batch, layer_labels, layout_for, resid_sites
from .readout import pooled_logits, token_logits
from .result import AnalysisResult
from .targets import _class_ids


@dataclass(repr=False)
class LogitLensResult(AnalysisResult):
    """`values` [batch, layer, token, class]; `part("pooled")` [batch, layer, class] is the
    model's own readout (its pooling, then norm and head) of each layer's residual stream."""

    def _class_labels(self) -> list:
        return self.labels("class")

    def _position(self, cls: Any) -> int:
        """Where a class (index or name) sits on the class axis (a subset keeps its labels)."""
        labels = self._class_labels()
        if "class" not in self.coords and isinstance(cls, Integral) and 0 <= cls < len(labels):
            return int(cls)
        for i, label in enumerate(labels):
            if label == cls or (self.class_names and isinstance(cls, Integral) and label == self.class_names[cls]):
                return i
        raise InputError(f"summary: class {cls!r} is not among this result's classes ({labels[:8]}...)")

    def top_k(self, k: int = 3, layer: int = -1, batch: int = 0) -> list[list[str]]:
        """The top-k class labels of each patch at one layer, as rows x cols lists of strings
        (k labels joined by ", "), for annotating a grid."""
        logits = self.select(batch=batch, layer=layer % self.values.shape[1]).grid()  # [class, rows, cols]
        top = logits.topk(min(k, logits.shape[0]), dim=0).indices  # [k, rows, cols]
        labels = self._class_labels()
        return [[", ".join(str(labels[i]) for i in top[:, r, c].tolist()) for c in range(top.shape[2])]
                for r in range(top.shape[1])]

    def summary(self, target: Any = None):
        """Per layer: the pooled readout's top-1 accuracy on `target` (default: the model's
        prediction, i.e. the last layer's top class; or one class, or one per image, as an index or
        a name), the mean
        rank of the target class (0 = top) among the result's classes, and the fraction of
        patches whose own readout ranks it first. A pandas DataFrame."""
        import pandas as pd

        pooled = self.part("pooled").values  # [batch, layer, class]
        batch = pooled.shape[0]
        if target is None:
            ids = pooled[:, -1].argmax(-1)
        else:
            if isinstance(target, (str, Integral)) or (isinstance(target, Tensor) and target.ndim == 0):
                target = [target.item() if isinstance(target, Tensor) else target] * batch
            elif isinstance(target, Tensor):
                target = target.tolist()
            if len(target) != batch:
                raise InputError(f"summary: {len(target)} targets for {batch} images (give one, or one per image)")
            ids = torch.tensor([self._position(t) for t in target])
        ids = ids.to(pooled.device)
        chosen = pooled.gather(2, ids[:, None, None].expand(-1, pooled.shape[1], 1))
        rank = (pooled > chosen).sum(-1).float()  # [batch, layer]
        patches = self.grid().flatten(-2)  # [batch, layer, class, patch]
        patch_top1 = (patches.argmax(2) == ids[:, None, None]).float().mean(-1)  # [batch, layer]
        return pd.DataFrame({
            "layer": self.labels("layer"),
            "accuracy": (rank == 0).float().mean(0).tolist(),
            "mean_rank": rank.mean(0).tolist(),
            "patch_top1": patch_top1.mean(0).tolist(),
        })

    def plot(self, facet: str | None = None, title: str | None = None, **index: int):
        """The logit of one class (`cls=`, default the model's prediction for `batch`) on the
        patch grid, one panel per layer, each patch annotated with its top class."""
        from ..viz.figures import lens_figure

        return lens_figure(self, title=title, **index)


def _subset(backend: Backend, classes: Any) -> Tensor | None:
    """Class indices [n] of a subset of classes (indices or names), or None for all."""
    if classes is None:
        return None
    if isinstance(classes, (str, Integral)):
        classes = [classes]
    if isinstance(classes, Tensor):
        classes = classes.flatten().tolist()
    if not isinstance(classes, Sequence) or not classes:
        raise InputError(f"classes: expected class indices or names, got {classes!r}")
    return _class_ids(backend, list(classes), len(classes), "classes")


def logit_lens(model: Any, images: Tensor, classes: Sequence[Any] | Tensor | None = None) -> LogitLensResult:
    """Read every token at every layer through the final norm and the head.

    images [batch, C, H, W] -> values [batch, layer, token, class]: layer 0 is the embedding
    (the residual stream entering block 0), layer i + 1 the stream after block i; tokens are
    the prefix tokens then the patches. Each token is read as if it were the pooled token:
    final norm, (SigLIP: the attention-pool head over that token alone), projection, head; a
    distilled model's two heads are averaged. `part("pooled")` [batch, layer, class] applies
    the model's own pooling first: at the last layer it equals the model's logits (for a CLS
    model so does the CLS token's readout; for an average-pool model the pooled readout is the
    mean over patches, taken before the norm and head, as the model does). `classes`: a subset
    of classes (indices or names) to keep; default all. CLIP: install a zero-shot head first
    (`clip.use_zero_shot_head(class_names)`).
    """
    check_batch(images, "logit_lens")
    backend = Backend.of(model)
    vit, cfg = backend.vit, backend.cfg
    if vit.head is None:
        raise PrismaError("logit_lens reads through the classifier head and this model has none: for CLIP "
                          "call clip.use_zero_shot_head(class_names) first")
    ids = _subset(backend, classes)
    sites = resid_sites(cfg.n_layers)
    with torch.no_grad():
        run = backend.run(images, read=sites)
        resid = torch.stack([run.acts[s] for s in sites], dim=1)  # [batch, layer, pos, d]
        per_token = token_logits(vit, resid)
        pooled = torch.stack([pooled_logits(vit, resid[:, i]) for i in range(resid.shape[1])], dim=1)
    names = backend.class_names
    coords: dict[str, list] = {"layer": layer_labels(cfg.n_layers)}
    if ids is not None:
        ids = ids.to(per_token.device)
        per_token, pooled = per_token[..., ids], pooled[..., ids]
        coords["class"] = [names[i] if names else i for i in ids.tolist()]
    layout = layout_for(backend, images)
    pooled_result = AnalysisResult("logit_lens/pooled", pooled, ("batch", "layer", "class"), layout,
                                   names, dict(coords))
    return LogitLensResult("logit_lens", per_token, ("batch", "layer", "token", "class"), layout, names,
                           coords, {"backend": backend.kind}, {"pooled": pooled_result})
