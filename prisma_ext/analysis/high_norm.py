"""High-norm (outlier) tokens and test-time registers.

Darcet et al. (ICLR 2024, "Vision Transformers Need Registers") found that large ViTs store
global information in a few patch tokens whose residual-stream norm is many times that of the
others; Jiang et al. (2025, "Vision Transformers Don't Need Trained Registers") traced them to a
few MLP neurons ("register neurons") and moved those neurons' activations onto an extra token
appended at inference, a test-time register.

`high_norm_tokens(model, images)`: per-layer token norms of `blocks.{i}.hook_resid_post`, the
outliers under a stated rule, where they sit on the patch grid, and the MLP neurons of the layer
where they first appear that write them, ranked by an exact decomposition of their norm.
`test_time_register(model, images, neurons, layer)`: the same model with a register token
appended and the neurons' activations moved onto it; norms, the readout's attention over the
patches and the output before and after.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, MissingSiteError
from .backend import Backend
from .common import check_batch, layout_for
from .result import AnalysisResult

RULE = ("a patch token is high-norm at a layer when its residual-stream norm "
        "(blocks.{i}.hook_resid_post) exceeds factor x the median norm of that image's patch tokens at "
        "that layer; prefix tokens (CLS, registers) are reported but never flagged")


def _check_factor(factor: Any) -> float:
    if isinstance(factor, bool) or not isinstance(factor, Real) or not factor > 1 or factor != factor \
            or factor == float("inf"):
        raise InputError(f"high_norm_tokens: factor must be a finite number > 1 (a ratio to the median patch norm), "
                         f"got {factor!r}")
    return float(factor)


def _check_sites(backend: Backend, sites: Sequence[str], method: str) -> None:
    known = set(backend.site_names)
    missing = [s for s in sites if s not in known]
    if missing:
        raise MissingSiteError(f"{method}: the model has no site(s) {', '.join(missing[:4])}"
                               f"{' ...' if len(missing) > 4 else ''} (needed: the residual stream after each block "
                               "and the MLP neurons)", missing)


def _check_images(backend: Backend, images: Any, method: str) -> None:
    check_batch(images, method)
    ph, pw = backend.layout.patch_size
    if images.shape[-2] % ph or images.shape[-1] % pw:
        raise InputError(f"{method}: image size {tuple(images.shape[-2:])} is not a multiple of the patch size "
                         f"{(ph, pw)}")


def high_norm_tokens(model: Any, images: Tensor, *, factor: float = 4.0, layer: int | None = None,
                     top_k: int = 10) -> AnalysisResult:
    """Outlier (high-norm) tokens of the residual stream, where they sit, and the neurons that write them.

    Rule: a patch token is high-norm at layer i when ``||resid_post_i[t]|| > factor * median_p
    ||resid_post_i[p]||``, the median over that image's patch tokens at that layer (default
    factor 4: the outliers Darcet et al. report are about 10x the typical norm; a clean model's
    patch norms stay within about 2x of their median). Prefix tokens are never flagged.

    Returns values [batch, layer, token] (the norms; layers "L0".."L{n-1}") with parts
    - "outliers" [batch, layer, token]: 1.0 where the rule flags the token;
    - "counts" [layer, patch]: how many images have an outlier at each patch position
      (`.grid()` puts it on the patch grid);
    - "neurons" [neuron] (the top_k, best first; coords "neuron": their indices): at the
      attribution layer (`layer`, default the first layer with an outlier), the mean over the
      outlier tokens t of neuron n's share of t's norm, ``act[t, n] * (W_out[n] . d_t)`` with
      ``d_t = resid_post[t] / ||resid_post[t]||``. Exactly: ``||resid_post[t]|| =
      resid_mid[t] . d_t + b_out . d_t + sum_n act[t, n] W_out[n] . d_t``; meta "mid_share" and
      "bias_share" hold the first two terms (averaged the same way).
    meta: rule, factor, threshold [batch, layer], layer (None: no outliers anywhere), neurons.
    """
    backend = Backend.of(model)
    method = "high_norm_tokens"
    factor = _check_factor(factor)
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1:
        raise InputError(f"{method}: top_k must be a positive int, got {top_k!r}")
    _check_images(backend, images, method)
    n_layers = backend.cfg.n_layers
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, Integral)
                              or not 0 <= layer < n_layers):
        raise InputError(f"{method}: layer must be an int in [0, {n_layers}), got {layer!r}")
    posts = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    _check_sites(backend, [*posts, *[f"blocks.{i}.mlp.hook_post" for i in range(n_layers)]], method)
    layout = layout_for(backend, images)
    with torch.no_grad():
        acts = backend.run(images, read=posts).acts
        resid = torch.stack([acts[s].float() for s in posts], 1)  # [batch, layer, pos, d]
        norms = resid.norm(dim=-1)
        patch = layout.patch_slice
        threshold = factor * norms[..., patch].median(dim=-1).values  # [batch, layer]
        outliers = torch.zeros_like(norms, dtype=torch.bool)
        outliers[..., patch] = norms[..., patch] > threshold[..., None]
        flagged = outliers.any(0).any(-1)  # [layer]
        if layer is None and bool(flagged.any()):
            layer = int(flagged.nonzero()[0])
        neurons, meta_extra = _attribute(backend, images, layer, outliers, top_k)
    counts = outliers[..., patch].sum(0).float()  # [layer, patch]
    labels = [f"L{i}" for i in range(n_layers)]
    meta = {"backend": backend.kind, "rule": RULE, "factor": factor, "threshold": threshold.cpu(), "layer": layer,
            "n_outliers": int(outliers.sum()), **meta_extra}
    parts = {
        "outliers": AnalysisResult("high_norm_tokens.outliers", outliers.float().cpu(), ("batch", "layer", "token"),
                                   layout, backend.class_names, {"layer": labels}, meta),
        "counts": AnalysisResult("high_norm_tokens.counts", counts.cpu(), ("layer", "patch"), layout,
                                 backend.class_names, {"layer": labels}, meta),
        "neurons": neurons,
    }
    return AnalysisResult(method, norms.cpu(), ("batch", "layer", "token"), layout, backend.class_names,
                          {"layer": labels}, meta, parts)


def _attribute(backend: Backend, images: Tensor, layer: int | None, outliers: Tensor,
               top_k: int) -> tuple[AnalysisResult, dict]:
    """The neurons of `layer`'s MLP ranked by their mean share of the outlier tokens' norms."""
    layout = layout_for(backend, images)
    empty = AnalysisResult("high_norm_tokens.neurons", torch.zeros(0), ("neuron",), layout, None, {"neuron": []},
                           {"layer": layer})
    if layer is None:
        return empty, {"neurons": [], "mid_share": None, "bias_share": None}
    mask = outliers[:, layer]  # [batch, pos]
    if not bool(mask.any()):
        return empty, {"neurons": [], "mid_share": None, "bias_share": None}
    sites = [f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_resid_post"]
    _check_sites(backend, sites, "high_norm_tokens")
    acts = backend.run(images, read=sites).acts
    mid, post, out = (acts[s].float()[mask] for s in sites)  # [n_out, ...]
    direction = out / out.norm(dim=-1, keepdim=True)  # [n_out, d]
    mlp = backend.need_weights(rf"^blocks\.{layer}\.mlp\.fc2\.").blocks[layer].mlp  # W_out, b_out
    w_out = mlp.W_out.detach().float().to(direction.device)  # [d_mlp, d]
    b_out = mlp.b_out
    share = post * (direction @ w_out.T)  # [n_out, d_mlp]
    score = share.mean(0)
    k = min(top_k, score.shape[0])
    top = score.topk(k).indices
    mid_share = float((mid * direction).sum(-1).mean())
    bias_share = 0.0 if b_out is None else float((direction @ b_out.detach().float().to(direction.device)).mean())
    idx = top.tolist()
    result = AnalysisResult("high_norm_tokens.neurons", score[top].cpu(), ("neuron",), layout, None,
                            {"neuron": idx}, {"layer": layer, "site": f"blocks.{layer}.mlp.hook_post"})
    return result, {"neurons": idx, "mid_share": mid_share, "bias_share": bias_share}


def test_time_register(model: Any, images: Tensor, neurons: Sequence[int] | AnalysisResult,
                       layer: int | None = None) -> AnalysisResult:
    """A test-time register (Jiang et al. 2025): one zero token appended after the last patch at
    the input of block 0 (an edit of `blocks.0.hook_resid_pre`, so every block sees it as a key,
    value and query; it is dropped again after the last block, before the readout). At
    `blocks.{layer}.mlp.hook_post`, for each neuron n: the register's activation is set to the
    maximum of n's activation over the patch tokens, and the patch tokens' activation of n is
    zeroed (prefix tokens keep theirs). Until the register holds the moved activations (blocks
    0..layer) its key is masked (at `attn.hook_pattern`, each query's weights renormalised over
    the other keys: the softmax with the register's score at -inf), so the model is unchanged up
    to that MLP; after it, every token attends to the register as to any token.
    Nothing in the weights changes.

    `neurons`: neuron indices at `layer`, or a `high_norm_tokens` result (its top neurons and
    layer; `layer`, if given, must agree). Either backend (on nnsight the source's blocks must
    accept one more token, as timm's, open_clip's and Hugging Face's do); not rotary models (the
    appended token has no position to rotate by).

    Returns values [batch, layer, token] (norms after, the register dropped) with parts
    "norms_before" (same axes), "attention_before"/"attention_after" [batch, layer, head, patch]
    (the readout's query weights times each pattern, over the patch keys) and
    "register_attention" [batch, layer, head] (the readout's attention to the register); meta:
    output_before/output_after, max_output_change, register_norm [batch, layer], neurons, layer.
    """
    method = "test_time_register"
    backend = Backend.of(model)
    backend.require_local(method, "it appends a register token, and a remote site table sets a site only to a "
                          "value of the same shape")
    if isinstance(neurons, AnalysisResult):
        found = neurons.meta.get("layer")
        if found is None:
            raise InputError(f"{method}: the high_norm_tokens result found no outliers, so no neurons to move")
        if layer is not None and layer != found:
            raise InputError(f"{method}: layer={layer} but the result's neurons are at layer {found}")
        neurons, layer = list(neurons.meta["neurons"]), found
    cfg = backend.cfg
    if getattr(cfg, "rotary", "none") != "none":
        raise InputError(f"{method}: a rotary model has no position for an appended token")
    n_layers = cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, Integral) or not 0 <= layer < n_layers:
        raise InputError(f"{method}: layer must be an int in [0, {n_layers}), got {layer!r}")
    neurons = list(neurons)
    if not neurons or any(isinstance(n, bool) or not isinstance(n, Integral) or not 0 <= n < cfg.d_mlp
                          for n in neurons):
        raise InputError(f"{method}: neurons must be a non-empty list of ints in [0, {cfg.d_mlp}), got {neurons!r}")
    _check_images(backend, images, method)
    posts = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    patterns = [f"blocks.{i}.attn.hook_pattern" for i in range(n_layers)]
    _check_sites(backend, [*posts, *patterns, f"blocks.{layer}.mlp.hook_post", "blocks.0.hook_resid_pre"], method)
    layout = layout_for(backend, images)
    patch, idx = layout.patch_slice, torch.tensor(neurons)
    last = posts[-1]
    kept: dict[str, Tensor] = {}

    def append(value: Tensor) -> Tensor:
        return torch.cat([value, value.new_zeros(value.shape[0], 1, value.shape[2])], 1)

    def move(value: Tensor) -> Tensor:
        value = value.clone()
        sel = idx.to(value.device)
        value[:, -1, sel] = value[:, patch][:, :, sel].max(1).values
        value[:, patch.start:patch.stop, sel] = 0
        return value

    def mask(value: Tensor) -> Tensor:  # pattern [batch, head, query, key]: no query reads the empty register
        kept = value[..., :-1] / (1 - value[..., -1:])  # = the softmax with the register's score at -inf
        return torch.cat([kept, torch.zeros_like(value[..., -1:])], -1)

    def drop(value: Tensor) -> Tensor:
        kept[last] = value
        return value[:, :-1]

    append.changes_tokens = drop.changes_tokens = True  # the nnsight backend lets these two resize a site

    with torch.no_grad():
        before = backend.run(images, read=[*posts, *patterns])
        after = backend.run(images, read=[*posts, *patterns],
                            edit={"blocks.0.hook_resid_pre": append, f"blocks.{layer}.mlp.hook_post": move, last: drop,
                                  **{f"blocks.{i}.attn.hook_pattern": mask for i in range(layer + 1)}})
        after.acts[last] = kept[last]
        weights = backend.readout.query_weights(before.acts[last]).float()  # [batch, pos]
        norms_before = torch.stack([before.acts[s].float().norm(dim=-1) for s in posts], 1)
        norms_full = torch.stack([after.acts[s].float().norm(dim=-1) for s in posts], 1)  # [batch, layer, pos+1]
        pat_before = torch.stack([before.acts[s].float() for s in patterns], 1)  # [b, l, h, q, k]
        pat_after = torch.stack([after.acts[s].float() for s in patterns], 1)
        w_after = torch.cat([weights, weights.new_zeros(weights.shape[0], 1)], 1)
        read_before = torch.einsum("bq,blhqk->blhk", weights, pat_before)
        read_after = torch.einsum("bq,blhqk->blhk", w_after, pat_after)
        change = float((after.output.float() - before.output.float()).abs().max())
    labels = [f"L{i}" for i in range(n_layers)]
    meta = {"backend": backend.kind, "layer": layer, "neurons": neurons, "output_before": before.output.detach().cpu(),
            "output_after": after.output.detach().cpu(), "max_output_change": change,
            "register_norm": norms_full[..., -1].cpu(),
            "variant": "zero register token appended at blocks.0.hook_resid_pre, its key masked in blocks 0..layer; "
                       "the neurons' max patch activation moved onto it and zeroed on the patches; dropped before "
                       "the readout"}

    def res(name: str, values: Tensor, dims: tuple[str, ...]) -> AnalysisResult:
        return AnalysisResult(f"{method}.{name}", values.cpu(), dims, layout, backend.class_names, {"layer": labels},
                              meta)

    parts = {
        "norms_before": res("norms_before", norms_before, ("batch", "layer", "token")),
        "attention_before": res("attention_before", read_before[..., patch], ("batch", "layer", "head", "patch")),
        "attention_after": res("attention_after", read_after[..., patch], ("batch", "layer", "head", "patch")),
        "register_attention": res("register_attention", read_after[..., -1], ("batch", "layer", "head")),
    }
    return AnalysisResult(method, norms_full[..., :-1].cpu(), ("batch", "layer", "token"), layout,
                          backend.class_names, {"layer": labels}, meta, parts)


test_time_register.__test__ = False  # not a pytest test, despite its name
