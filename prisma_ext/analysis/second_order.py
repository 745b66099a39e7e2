"""Second-order effects of MLP neurons on CLIP's image embedding (Gandelsman, Efros & Steinhardt,
ICLR 2025, "Interpreting the Second-Order Effects of Neurons in CLIP").

A neuron n of layer l writes act[s, n] * W_out[n] into the residual stream at every token s.
Its first-order (direct) effect is that write at the pooled token(s), read through the final
norm and the projection. Its second-order effect is what the write adds to the embedding through
each later attention layer's values: layer l' reads the write through its norm ln1 (scale frozen
at its clean value, so the norm is linear), W_V[h] and W_O[h], weighted by the clean attention of
the pooled token(s) to token s, and the result is read through the final norm (frozen) and the
projection, as in `clip_decomposition`:

    second[n] = sum_{l' > l} sum_h sum_s a[l', h, s] * act[s, n] / scale_{l'}[s]
                * (w_{l'} * centre(W_out[n])) @ W_V[l', h] @ W_O[l', h] @ D^T

with a[l', h, s] the readout's query weights (divided by the final norm's frozen scale) times
the pattern. Paths through later MLPs or through two attention layers are left out, as in the
paper. Each call checks the per-layer sums against the model's own attention (the values
recomputed from the norm's input minus the neurons' write, patterns frozen).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError, PrismaError, check_identity
from .backend import Backend
from .clip_decomposition import _readout_map, _require_sites, clip_backend, text_embeddings
from .common import NO_TARGET, in_chunks, layout_for
from .result import AnalysisResult

# why the second-order methods run on local models only
SECOND_ORDER_REMOTE = ("it reads every later layer's W_V, block norms and MLP weights and reruns the blocks' own "
                       "forward to check itself, none of which a remote model holds")


def _check_layer(layer: Any, n_layers: int, method: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, Integral) or not 0 <= layer < n_layers:
        raise InputError(f"{method}: layer must be an int in [0, {n_layers}), got {layer!r}")
    if layer == n_layers - 1:
        raise InputError(f"{method}: layer {layer} is the last block; its neurons have no later attention layer, "
                         "so no second-order effect (their whole effect is first-order: see part 'first_order' of "
                         "an earlier layer's call, or px.clip_decomposition's 'mlp' part)")
    return int(layer)


def _check_neurons(neurons: Any, d_mlp: int, method: str) -> list[int]:
    if neurons is None:
        return list(range(d_mlp))
    if isinstance(neurons, Tensor):
        neurons = neurons.tolist()
    neurons = [neurons] if isinstance(neurons, Integral) else list(neurons)
    if not neurons or any(isinstance(n, bool) or not isinstance(n, Integral) or not 0 <= n < d_mlp for n in neurons):
        raise InputError(f"{method}: neurons must be a non-empty list of ints in [0, {d_mlp}) (or None for all), "
                         f"got {neurons!r}")
    if len(set(neurons)) != len(neurons):
        raise InputError(f"{method}: neurons {neurons!r} repeat an index")
    return [int(n) for n in neurons]


def _sites(layer: int, n_layers: int) -> list[str]:
    later = range(layer + 1, n_layers)
    return [f"blocks.{layer}.mlp.hook_post", *[f"blocks.{i}.hook_resid_pre" for i in later],
            *[f"blocks.{i}.attn.hook_pattern" for i in later], *[f"blocks.{i}.attn.hook_v" for i in later],
            *[f"blocks.{i}.hook_attn_out" for i in later], f"blocks.{n_layers - 1}.hook_resid_post"]


def _with_frozen_scale(norm: Any, x: Tensor, shifted: Tensor) -> Tensor:
    """The block norm's own forward on `shifted` [..., d] with its scale (`hook_scale`) held at
    its value on `x` (a temporary forward hook on the norm, removed even on error)."""
    kept: list[Tensor] = []

    def hold(module: Any, inputs: Any, scale: Tensor) -> Tensor:
        if not kept:
            kept.append(scale)
        return kept[0]

    handle = norm.hook_scale.register_forward_hook(hold)
    try:
        norm(x)
        return norm(shifted)
    finally:
        handle.remove()


def _norm_scale(norm: Any, x: Tensor) -> Tensor:
    """The scale [..., 1] a block norm divides x [..., d] by."""
    if norm.center:
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()


class _Paths:
    """Per later layer, each neuron's path to the embedding through each head's values:
    M[l'] [head, neuron, embed] = (w * centre(W_out[n])) @ W_V[h] @ W_O[h] @ D^T."""

    def __init__(self, backend: Backend, layer: int, neurons: list[int]):
        vit = backend.vit
        D, _ = _readout_map(backend)
        self.D = D
        w_out = vit.blocks[layer].mlp.W_out.detach()[neurons].to(D)  # [n, d_model]
        self.direct = w_out @ D.T  # [n, embed]
        self.later = list(range(layer + 1, backend.cfg.n_layers))
        self.maps: dict[int, Tensor] = {}
        for i in self.later:
            block = vit.blocks[i]
            u = w_out - w_out.mean(-1, keepdim=True) if block.ln1.center else w_out
            if block.ln1.w is not None:
                u = u * block.ln1.w.detach().to(D)
            attn = block.attn
            through_v = torch.einsum("nd,hdz->hnz", u, attn.W_V.detach().to(D))
            to_embed = torch.einsum("hzm,em->hze", attn.W_O.detach().to(D), D)  # contracted first: cheaper
            self.maps[i] = torch.bmm(through_v, to_embed)  # [head, n, embed]


def second_order_effects(clip: Any, images: Tensor, layer: int, neurons: Sequence[int] | None = None, *,
                         per_layer: bool = False, batch_size: int | None = None,
                         progress: bool = False) -> AnalysisResult:
    """Each neuron's second-order effect on CLIP's image embedding (before normalising it).

    `layer`: the MLP whose neurons (`blocks.{layer}.mlp.hook_post`) are measured; `neurons`:
    their indices (None: all d_mlp). Returns values [batch, neuron, embed], the effect through
    every later attention layer (patterns, the later norms' scales and the final norm's scale
    frozen at their clean values), with parts
    - "first_order" [batch, neuron, embed]: the neuron's direct write at the pooled token(s);
    - "by_layer" [batch, neuron, layer, embed] (with `per_layer=True`): the effect through each
      later layer (coords "layer": "L{l+1}".."L{n-1}"); summed over layers it is `values`.
    Both are linear in the neuron's activation, so the effect of changing the activation (an
    ablation to its mean, say) is the effect of the change. meta: layer, neurons,
    "check_error" (the largest miss of the per-layer sums over the neurons against the model's
    own attention; above 1e-4 of their size it raises IdentityError). Score the effects against
    texts with `neuron_texts`.
    """
    method = "second_order_effects"
    backend = clip_backend(clip, method)
    backend.require_local(method, SECOND_ORDER_REMOTE)
    cfg = backend.cfg
    layer = _check_layer(layer, cfg.n_layers, method)
    neurons = _check_neurons(neurons, cfg.d_mlp, method)
    if cfg.mlp_norm:
        raise PrismaError(f"{method}: this tower normalises the MLP's hidden activations before fc2 "
                          "(scale_mlp_norm), so a neuron's write is not its own")
    _require_sites(backend, _sites(layer, cfg.n_layers), method)
    paths = _Paths(backend, layer, neurons)
    result = in_chunks(backend, images, NO_TARGET, batch_size, progress, method,
                       lambda x, _: _effects(backend, x, layer, neurons, paths, per_layer))
    result.meta["check_error"] = float(result.meta.pop("image_errors").max())
    return result


def pooled_weights(backend: Backend, acts: dict[str, Tensor], D: Tensor) -> tuple[Tensor, Tensor]:
    """(c [batch, q], queries [q]): the readout's pooled tokens and what a unit write at each
    counts in the embedding, the final norm's scale frozen at its clean value."""
    final = acts[f"blocks.{backend.cfg.n_layers - 1}.hook_resid_post"].to(D)
    weights = backend.readout.token_weights(final.shape[1]).to(D)
    queries = weights.nonzero()[:, 0]
    return weights[queries] / backend.readout.final_scale(final)[:, queries, 0], queries


def linear_effects(backend: Backend, acts: dict[str, Tensor], act: Tensor, paths: _Paths,
                   pooled: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(first [batch, n, embed], by_layer [batch, n, later, embed]) of activations `act`
    [batch, pos, n] of the paths' neurons, with the patterns and scales of the run `acts`
    (read at `_sites`) and its `pooled_weights`: both linear in `act`."""
    vit, D = backend.vit, paths.D
    c, queries = pooled
    act = act.to(D)
    first = torch.einsum("bq,bqn,ne->bne", c, act[:, queries], paths.direct)
    by_layer = []
    for i in paths.later:
        scale = _norm_scale(vit.blocks[i].ln1, acts[f"blocks.{i}.hook_resid_pre"].to(D))[..., 0]  # [b, pos]
        a = torch.einsum("bq,bhqs->bhs", c, acts[f"blocks.{i}.attn.hook_pattern"].to(D)[:, :, queries])
        g = torch.einsum("bhs,bsn->bhn", a, act / scale[..., None])
        by_layer.append(torch.einsum("bhn,hne->bne", g, paths.maps[i]))
    return first, torch.stack(by_layer, 2)


def _effects(backend: Backend, images: Tensor, layer: int, neurons: list[int], paths: _Paths,
             per_layer: bool) -> AnalysisResult:
    with torch.no_grad():
        acts = backend.run(images, read=_sites(layer, backend.cfg.n_layers)).acts
        act = acts[f"blocks.{layer}.mlp.hook_post"][..., neurons]  # [batch, pos, n]
        pooled = pooled_weights(backend, acts, paths.D)
        first, stacked = linear_effects(backend, acts, act, paths, pooled)
        error = _check(backend, images, acts, layer, neurons, paths.D, pooled, stacked.sum(1))

    layout = layout_for(backend, images)
    labels = [f"L{i}" for i in paths.later]
    meta = {"layer": layer, "neurons": neurons, "backend": backend.kind, "image_errors": error,
            "frozen": "attention patterns, later ln1 scales and the final norm's scale",
            "site": f"blocks.{layer}.mlp.hook_post"}
    coords = {"neuron": [str(n) for n in neurons]}
    parts = {"first_order": AnalysisResult("second_order_effects/first_order", first, ("batch", "neuron", "embed"),
                                           layout, None, coords, meta)}
    if per_layer:
        parts["by_layer"] = AnalysisResult("second_order_effects/by_layer", stacked,
                                           ("batch", "neuron", "layer", "embed"), layout, None,
                                           {**coords, "layer": labels}, meta)
    return AnalysisResult("second_order_effects", stacked.sum(2), ("batch", "neuron", "embed"), layout, None,
                          coords, meta, parts)


def _check(backend: Backend, images: Tensor, acts: dict[str, Tensor], layer: int, neurons: list[int],
           D: Tensor, pooled: tuple[Tensor, Tensor], want: Tensor) -> Tensor:
    """The per-layer effects summed over the neurons, `want` [batch, later, embed], against the
    model's own attention: each later layer's values recomputed (its qkv) from its norm's input
    minus the neurons' write (norm scale frozen), every later pattern frozen at its clean value;
    the change of each layer's attention output at the pooled tokens, through the readout map.
    Returns each image's largest miss [batch]."""
    vit, n_layers = backend.vit, backend.cfg.n_layers
    c, queries = pooled
    mlp = vit.blocks[layer].mlp
    act = acts[f"blocks.{layer}.mlp.hook_post"]
    write = act[..., neurons] @ mlp.W_out.detach()[neurons].to(act)  # [batch, pos, d_model]
    later = range(layer + 1, n_layers)
    edits = {}
    for i in later:
        block = vit.blocks[i]
        x = acts[f"blocks.{i}.hook_resid_pre"]
        shifted = _with_frozen_scale(block.ln1, x, x - write)
        rows = block.attn._qkv_rows(2)
        v = F.linear(shifted, block.attn.qkv.weight[rows], block.attn.qkv.bias[rows])
        v = v.view(*v.shape[:2], block.attn.n_heads, block.attn.d_head)
        pattern = acts[f"blocks.{i}.attn.hook_pattern"]
        edits[f"blocks.{i}.attn.hook_v"] = lambda _, v=v: v
        edits[f"blocks.{i}.attn.hook_pattern"] = lambda _, p=pattern: p
    outs = [f"blocks.{i}.hook_attn_out" for i in later]
    edited = backend.run(images, read=outs, edit=edits).acts
    got = torch.stack([torch.einsum("bq,bqd,ed->be", c, (acts[s] - edited[s]).to(D)[:, queries], D) for s in outs], 1)
    check_identity(want, got, lambda miss, size: (
        f"second_order_effects: the neurons' effects through the later attention layers miss the model's own "
        f"attention by {miss:.3g} (their size {size:.3g}): a later block is not the pre-norm attention the formula "
        "reads (a hook left on the tower, or an attention that is not linear in its values)"))
    return (want - got).abs().flatten(1).max(1).values


# ---------------------------------------------------------------------- texts
def _pursuit(direction: Tensor, bank: Tensor, k: int) -> tuple[list[int], list[float], float]:
    """Orthogonal matching pursuit of a unit `direction` [d] over unit text embeddings
    `bank` [n, d]: k texts (indices), their least-squares coefficients, and the share of the
    direction's squared norm they explain."""
    chosen: list[int] = []
    coef = direction.new_zeros(0)
    residual = direction
    for _ in range(min(k, bank.shape[0])):
        score = (bank @ residual).abs()
        if chosen:
            score[chosen] = -1.0
        j = int(score.argmax())
        if score[j] <= 1e-12:
            break
        chosen.append(j)
        basis = bank[chosen]  # [m, d]
        coef = torch.linalg.lstsq(basis.T, direction[:, None]).solution[:, 0]
        residual = direction - coef @ basis
    explained = float(1 - residual.pow(2).sum() / direction.pow(2).sum())
    return chosen, coef.tolist(), explained


def neuron_texts(effects: AnalysisResult, clip: Any, texts: Sequence[str], k: int = 3) -> AnalysisResult:
    """The texts that describe each neuron's second-order effect: its first principal direction
    over the images (uncentred, signed so the mean effect projects positively) written as a
    sparse sum of k unit text embeddings by orthogonal matching pursuit over `texts`.

    Returns values [neuron] (the share of the first direction's variance among all the neuron's
    effects: near 1 when the effect is rank one, as the paper reports), meta "texts" [neuron][k],
    "coefficients" [neuron][k] (signed: a negative coefficient is a text the neuron writes
    against), "explained" [neuron] (share of the direction's squared norm the texts span) and
    "cosine" [neuron][k] (each chosen text's cosine with the direction).
    """
    method = "neuron_texts"
    if effects.method != "second_order_effects":
        raise InputError(f"{method}: expected the result of px.second_order_effects, got {effects.method!r}")
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise InputError(f"{method}: k (texts per neuron) must be a positive int, got {k!r}")
    names = [texts] if isinstance(texts, str) else list(texts) if isinstance(texts, Sequence) else texts
    bank = text_embeddings(clip, texts, method).double()
    values = effects.values.double()  # [batch, neuron, embed]
    rank_one, chosen, coefs, explained, cosines = [], [], [], [], []
    for n in range(values.shape[1]):
        x = values[:, n]
        _, s, Vh = torch.linalg.svd(x, full_matrices=False)
        total = float(s.pow(2).sum())
        if total <= 0:
            rank_one.append(float("nan"))
            chosen.append([]), coefs.append([]), explained.append(float("nan")), cosines.append([])
            continue
        direction = Vh[0] * (1.0 if float(x.mean(0) @ Vh[0]) >= 0 else -1.0)
        idx, coef, share = _pursuit(direction, bank, k)
        rank_one.append(float(s[0] ** 2) / total)
        chosen.append([names[j] for j in idx])
        coefs.append(coef)
        explained.append(share)
        cosines.append([float(bank[j] @ direction) for j in idx])
    meta = {**{key: v for key, v in effects.meta.items() if key in ("layer", "neurons")}, "texts": chosen,
            "coefficients": coefs, "explained": explained, "cosine": cosines, "k": k}
    return AnalysisResult(method, torch.tensor(rank_one), ("neuron",), effects.layout, None,
                          {"neuron": effects.labels("neuron")}, meta)
