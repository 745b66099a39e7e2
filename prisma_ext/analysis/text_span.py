"""TextSpan (Gandelsman, Efros & Steinhardt, ICLR 2024): for one attention head of CLIP's vision
tower, a short basis of texts that spans what the head writes into the image embedding.

The greedy algorithm, on the head's per-image contributions C [images, embed] (centred over the
images) and unit-norm text embeddings R [texts, embed]: project R onto the space C spans; then
repeatedly pick the text whose (projected, not renormalised) direction carries the most of C's
remaining variance, ||C r||^2, and project that direction out of C and out of every remaining
text. The explained variance after b picks is 1 - ||C_b||^2 / ||C_0||^2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .clip_decomposition import clip_backend, clip_decomposition, text_embeddings
from .result import AnalysisResult


@dataclass
class SpanBasis:
    """One head's greedy basis: the chosen texts' indices in order and the fraction of the head's
    variance explained after each basis size (non-decreasing, at most 1)."""

    indices: list[int]
    explained: Tensor


def span_basis(outputs: Tensor, texts: Tensor, k: int, rtol: float = 1e-6, rank: int | None = None) -> SpanBasis:
    """The greedy TextSpan basis of one head: outputs [n_images, d] (the head's contributions),
    texts [n_texts, d] (text embeddings; normalised to unit norm here), k picks. The texts are
    first projected onto the head's output space: its first `rank` principal directions over
    the images (None: every direction they span; the authors' code uses the first 80 of ViT-L).

    Stops early when the head's outputs are explained to `rtol` (nothing left to pick)."""
    if outputs.ndim != 2 or texts.ndim != 2 or outputs.shape[1] != texts.shape[1]:
        raise InputError(f"span_basis: expected outputs [n_images, d] and texts [n_texts, d], got "
                         f"{tuple(outputs.shape)} and {tuple(texts.shape)}")
    C = (outputs - outputs.mean(0)).double()
    R = torch.nn.functional.normalize(texts.double(), dim=-1)
    total = C.pow(2).sum()
    if total <= 0:
        return SpanBasis([], torch.zeros(0))
    # the head's output space over these images: the row space of C, as an orthonormal basis
    _, s, Vh = torch.linalg.svd(C, full_matrices=False)
    V = Vh[s > s[0] * 1e-7][:rank].T  # [d, rank]
    R = (R @ V) @ V.T
    chosen, explained = [], []
    for _ in range(min(k, R.shape[0])):
        gain = (C @ R.T).pow(2).sum(0)  # variance of C along each remaining text's direction
        if chosen:
            gain[chosen] = -1.0
        j = int(gain.argmax())
        norm = R[j].norm()
        if gain[j] <= 0 or norm <= 1e-12:
            break
        r = R[j] / norm
        C = C - (C @ r)[:, None] * r
        R = R - (R @ r)[:, None] * r
        chosen.append(j)
        explained.append(float(1 - C.pow(2).sum() / total))
        if explained[-1] >= 1 - rtol:
            break
    return SpanBasis(chosen, torch.tensor(explained, dtype=outputs.dtype))


class TextSpanResult(AnalysisResult):
    """`text_span`'s result: values [head, rank] (explained variance after each basis size),
    `meta["texts"]` the chosen texts per head, in order; `to_dataframe()` names them."""

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for i, head in enumerate(self.labels("head")):
            for b, text in enumerate(self.meta["texts"][i]):
                rows.append((head, b + 1, text, float(self.values[i, b])))
        return pd.DataFrame(rows, columns=["head", "rank", "text", "explained_variance"])


def _check_heads(heads: Any, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    if heads is None:
        return [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    heads = [heads] if isinstance(heads, tuple) else list(heads)
    if not heads:
        raise InputError("text_span: `heads` is empty; give (layer, head) pairs, or None for every head")
    out = []
    for pair in heads:
        ok = (isinstance(pair, Sequence) and len(pair) == 2
              and all(isinstance(v, Integral) and not isinstance(v, bool) for v in pair))
        if not ok or not (0 <= pair[0] < n_layers and 0 <= pair[1] < n_heads):
            raise InputError(f"text_span: heads are (layer, head) pairs with layer in [0, {n_layers}) and head in "
                             f"[0, {n_heads}), got {pair!r}")
        out.append((int(pair[0]), int(pair[1])))
    return out


def text_span(clip: Any, images: Tensor, texts: Sequence[str], heads: Sequence[tuple[int, int]] | None = None,
              k: int = 5, *, rank: int | None = None, batch_size: int | None = None,
              progress: bool = False) -> TextSpanResult:
    """The TextSpan basis of each head in `heads` ((layer, head) pairs; None: every head) from a
    bank of `texts`, over the heads' contributions to the image embeddings of `images`
    (`clip_decomposition`, final norm's scale frozen).

    Returns values [head, rank] (rank 1..k): the fraction of the head's variance over the images
    explained by its first `rank` texts; `meta["texts"]` [head][rank] the texts chosen in order,
    `meta["indices"]` their indices in `texts`. A head explained fully before k picks stops
    there (its later entries are NaN, with no text). `rank`: project the texts onto each head's
    first `rank` principal directions over the images before the search (None: all of them).
    `to_dataframe()`: head, rank, text, explained_variance. Texts longer than the text tower's
    context are refused, not truncated.
    """
    method = "text_span"
    backend = clip_backend(clip, method)
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise InputError(f"{method}: k (the basis size) must be a positive int, got {k!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, Integral) or rank < 1):
        raise InputError(f"{method}: rank (principal directions kept) must be a positive int or None, got {rank!r}")
    cfg = backend.cfg
    pairs = _check_heads(heads, cfg.n_layers, cfg.n_heads)
    bank = text_embeddings(clip, texts, method)
    names = [texts] if isinstance(texts, str) else list(texts)
    if isinstance(images, Tensor) and images.ndim == 4 and images.shape[0] < 2:
        raise InputError(f"{method}: needs at least 2 images to measure a head's variance, got {images.shape[0]}")
    decomposition = clip_decomposition(clip, images, tokens=False, batch_size=batch_size, progress=progress)
    per_head = decomposition.values
    explained = per_head.new_full((len(pairs), k), float("nan"))
    chosen, indices = [], []
    for row, (layer, h) in enumerate(pairs):
        basis = span_basis(per_head[:, layer, h], bank.to(per_head), k, rank=rank)
        explained[row, : len(basis.indices)] = basis.explained
        indices.append(basis.indices)
        chosen.append([names[j] for j in basis.indices])
    meta = {"texts": chosen, "indices": indices, "heads": pairs, "k": k, "n_texts": len(names),
            "n_images": int(images.shape[0]), "rank": rank, "max_error": decomposition.meta["max_error"]}
    return TextSpanResult(method, explained, ("head", "rank"), decomposition.layout, None,
                          {"head": [f"L{layer}H{h}" for layer, h in pairs], "rank": list(range(1, k + 1))}, meta)
