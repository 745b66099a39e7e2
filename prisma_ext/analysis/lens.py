"""Patch logit lens: every token of every layer read out through the final norm and head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, PrismaError, check_identity
from .backend import Backend
from .common import check_batch, in_chunks, layer_labels, layout_for, resid_sites
from .result import AnalysisResult
from .targets import ClassTarget, FunctionTarget, Target, as_target, class_ids


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
        patch grid, each patch annotated with its top class: one panel per layer (`facet="layer"`,
        the default; `batch=` picks the image), or one per image (`facet="batch"`; `layer=`
        picks the layer, default the last)."""
        from ..viz.figures import lens_figure

        return lens_figure(self, facet=facet or "layer", title=title, **index)


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
    return class_ids(backend, list(classes), len(classes), "classes")


def logit_lens(model: Any, images: Tensor, target: Any = None, *, classes: Sequence[Any] | Tensor | None = None,
               batch_size: int | None = None, progress: bool = False) -> LogitLensResult:
    """Read every token at every layer through the final norm and the head.

    images [batch, C, H, W] -> values [batch, layer, token, class]: layer 0 is the embedding
    (the residual stream entering block 0), layer i + 1 the stream after block i; tokens are
    the prefix tokens then the patches. Each token is read as if it were the pooled token:
    final norm, (SigLIP: the attention-pool head over that token alone), projection, head; a
    distilled model's two heads are averaged. `part("pooled")` [batch, layer, class] applies
    the model's own pooling first: at the last layer it equals the model's logits (for a CLS
    model so does the CLS token's readout; for an average-pool model the pooled readout is the
    mean over patches, taken before the norm and head, as the model does).
    `target` (a class, one per image, `LogitDiff`, `ClassProb`; default None, the predicted class):
    `part("target")` [batch, layer, token] and `part("target_pooled")` [batch, layer] are its score
    read from every token and from the pooled readout, and the figure and summary show it.
    `classes`: a subset of classes (indices or names) to keep; default all. CLIP: install a
    zero-shot head first (`clip.use_zero_shot_head(class_names)`). `batch_size`: images per
    forward pass (default all); `progress`: a bar over the chunks.
    """
    check_batch(images, "logit_lens")
    backend = Backend.of(model)
    vit = backend.vit
    if vit.head is None:
        raise PrismaError("logit_lens reads through the classifier head and this model has none: for CLIP "
                          "call clip.use_zero_shot_head(class_names) first")
    target = as_target(target)
    if target.sites or isinstance(target, FunctionTarget):
        raise InputError(f"logit_lens reads each token through the head: its target must be a function of "
                         f"the class logits (a class, a LogitDiff, a ClassProb), got {target.describe()}")
    ids = _subset(backend, classes)
    return in_chunks(backend, images, target, batch_size, progress, "logit_lens",
                     lambda x, bound: _lens(backend, x, bound, ids))


def _lens(backend: Backend, images: Tensor, target: Target, ids: Tensor | None) -> LogitLensResult:
    cfg, readout = backend.cfg, backend.readout
    sites = resid_sites(cfg.n_layers)
    with torch.no_grad():
        run = backend.run(images, read=sites)
        resid = torch.stack([run.acts[s] for s in sites], dim=1)  # [batch, layer, pos, d]
        per_token = readout.token_logits(resid)
        pooled = torch.stack([readout.pooled_logits(resid[:, i]) for i in range(resid.shape[1])], dim=1)
        check_last_layer(pooled[:, -1], run.output)
        rows = torch.arange(images.shape[0])
        on_tokens = _target_scores(target, per_token, rows)
        on_pooled = _target_scores(target, pooled, rows)
    names = backend.class_names
    coords: dict[str, list] = {"layer": layer_labels(cfg.n_layers)}
    if ids is not None:
        ids = ids.to(per_token.device)
        per_token, pooled = per_token[..., ids], pooled[..., ids]
        coords["class"] = [names[i] if names else i for i in ids.tolist()]
    layout = layout_for(backend, images)
    layer_coords = {"layer": coords["layer"]}
    meta = {"backend": backend.kind, "target": target.describe()}
    if isinstance(target, ClassTarget):
        meta["target_class"] = target.ids  # [batch]
    parts = {
        "pooled": AnalysisResult("logit_lens/pooled", pooled, ("batch", "layer", "class"), layout, names, dict(coords)),
        "target": AnalysisResult("logit_lens/target", on_tokens, ("batch", "layer", "token"), layout, names,
                                 layer_coords, meta),
        "target_pooled": AnalysisResult("logit_lens/target_pooled", on_pooled, ("batch", "layer"), layout, names,
                                        layer_coords, meta),
    }
    return LogitLensResult("logit_lens", per_token, ("batch", "layer", "token", "class"), layout, names,
                           coords, meta, parts)


def check_last_layer(readout: Tensor, output: Tensor) -> None:
    """The lens's identity: its pooled readout of the last layer is the model's output."""
    check_identity(readout, output, lambda miss, size: (
        f"logit_lens: the readout of the last layer differs from the model's output by {miss:.3g} (outputs "
        f"up to {size:.3g}): something between the final residual stream and the output that the readout does "
        "not know acts on it (a hook on hook_pooled / hook_image_embed / the head, or a head that is not what "
        "the adapter said). Give the adapter the real head (docs/adapters.md) instead of a hook"))


def _target_scores(target: Target, logits: Tensor, rows: Tensor) -> Tensor:
    """The target's score of logits [batch, ..., class] -> [batch, ...] (image i's rows scored as image i)."""
    batch, inner = logits.shape[0], logits.shape[1:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    per_row = rows.repeat_interleave(flat.shape[0] // batch)
    return target.score(flat, {}, rows=per_row).reshape(batch, *inner)
