"""CLIP's image embedding as an exact sum over heads, source tokens, MLPs and the embedding
(Gandelsman, Efros & Steinhardt, ICLR 2024, "Interpreting CLIP's Image Representation via
Text-Based Decomposition"), and the parts' scores against text embeddings.

The final norm's scale is frozen at its value on the images (TL's `apply_ln_to_stack`, as in
direct logit attribution): each part is centred, divided by that scale, multiplied by the norm's
weight and projected; the norm's bias and the projection's bias make the constant part. With the
scale frozen the parts sum to `clip.encode_image(images)` exactly (checked on every call).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError, MissingSiteError, PrismaError, check_identity
from .backend import Backend
from .common import NO_TARGET, in_chunks, layout_for
from .result import AnalysisResult

PARTS = ("token", "attn_bias", "mlp", "embedding", "constant")


# ---------------------------------------------------------------------- the model
def clip_backend(clip: Any, method: str) -> Backend:
    """The vision tower of a CLIP as a backend whose output is the image embedding: a
    HookedCLIP's (TL backend) or a TracedCLIP's (nnsight backend, `clip_backend.TracedCLIPBackend`);
    refuses any other model and towers the decomposition cannot split."""
    from .clip_backend import embedding_backend

    backend = embedding_backend(clip, method)
    vit = backend.vit
    cfg = vit.cfg
    if not cfg.d_proj or getattr(vit, "proj", None) is None:
        raise PrismaError(f"{method}: this CLIP's vision tower has no image projection to split through")
    if not vit.readout.pools_linearly:
        raise PrismaError(f"{method}: this vision tower pools its tokens with an attention head "
                          "(global_pool='map'), which is not linear in the residual stream, so the embedding "
                          "is no sum of per-head parts")
    if cfg.n_dist:
        raise PrismaError(f"{method}: a distilled tower reads two tokens with two heads; no single embedding to split")
    if cfg.attn_norm:
        raise PrismaError(f"{method}: this tower normalises the heads' outputs together before the output "
                          "projection (scale_attn_norm), so a head's write is not its own")
    return backend


def _sites(n_layers: int, tokens: bool) -> list[str]:
    sites = ["blocks.0.hook_resid_pre", f"blocks.{n_layers - 1}.hook_resid_post"]
    for i in range(n_layers):
        sites += [f"blocks.{i}.hook_mlp_out"]
        sites += ([f"blocks.{i}.attn.hook_v", f"blocks.{i}.attn.hook_pattern"] if tokens
                  else [f"blocks.{i}.attn.hook_z"])
    return sites


def _require_sites(backend: Backend, sites: list[str], method: str) -> None:
    have = set(backend.site_names)
    missing = [s for s in sites if s not in have]
    if missing:
        raise MissingSiteError(f"{method} reads {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}, "
                               "which this vision tower does not have (an attention-only or otherwise partial "
                               "tower): the decomposition needs every block's attention and MLP sites", missing)


def _readout_map(backend: Backend) -> tuple[Tensor, Tensor]:
    """(D [d_embed, d_model], const [d_embed]): a vector x of the final residual stream at one
    token, centred and divided by its frozen scale, adds (x / scale) @ D.T to the embedding
    (times the token's pooling weight); const is the projection's bias plus the norm's bias
    through the projection."""
    readout, proj = backend.readout, backend.vit.proj
    w, b = readout.affine()
    W = proj.weight  # [d_embed, d_model]
    D = readout.to_residual(W * w if w is not None else W, W.new_ones(()))  # centring, as DLA's directions
    const = proj.bias if proj.bias is not None else W.new_zeros(W.shape[0])
    if b is not None:
        const = const + W @ b
    return D.detach(), const.detach()


# ---------------------------------------------------------------------- the decomposition
def clip_decomposition(clip: Any, images: Tensor, *, tokens: bool = True, batch_size: int | None = None,
                       progress: bool = False) -> AnalysisResult:
    """CLIP's image embedding (`clip.encode_image(images)`, before normalising it to unit norm)
    as an exact sum of parts, with the final norm's scale frozen at its clean value.

    Returns values [batch, layer, head, embed]: what each attention head writes into the
    embedding at the pooled token(s), through the final norm and the projection. Parts:
    - "token" [batch, layer, head, token, embed] (with `tokens=True`, the default): each head's
      write split by the source token it reads, pattern[pooled, s] * v[s] @ W_O[head]; summed
      over tokens it is `values`. It costs layer*head*token*embed floats per image (58 MB for
      ViT-B/16); `tokens=False` leaves it out (heads are then read from `hook_z`).
    - "attn_bias" [batch, layer, embed]: each layer's attention output bias.
    - "mlp" [batch, layer, embed]: each MLP's output at the pooled token(s).
    - "embedding" [batch, embed]: the residual stream entering block 0 (after `ln_pre`).
    - "constant" [batch, embed]: the projection's bias and the final norm's bias through it.

    `values.sum((1, 2)) + attn_bias.sum(1) + mlp.sum(1) + embedding + constant` is the image
    embedding (`meta["image_embedding"]`); the largest miss over the batch is
    `meta["max_error"]`, and a miss above 1e-4 of the embedding's size raises IdentityError.
    For an average-pool tower the pooled token is the mean of the patch tokens, each with its
    own frozen scale. Score the parts against text with `decomposition_scores`.
    """
    method = "clip_decomposition"
    backend = clip_backend(clip, method)
    _require_sites(backend, _sites(backend.cfg.n_layers, tokens), method)
    result = in_chunks(backend, images, NO_TARGET, batch_size, progress, method,
                       lambda x, _: _decompose(backend, x, tokens))
    total = total_of(result)
    result.meta["max_error"] = float((total - result.meta["image_embedding"]).abs().max())
    return result


def total_of(result: AnalysisResult) -> Tensor:
    """The sum of a decomposition's parts [batch, ...]: heads (all source tokens), attention
    biases, MLPs, the embedding and the constant."""
    return (result.values.sum((1, 2)) + result.part("attn_bias").values.sum(1) + result.part("mlp").values.sum(1)
            + result.part("embedding").values + result.part("constant").values)


def _decompose(backend: Backend, images: Tensor, tokens: bool) -> AnalysisResult:
    vit, cfg = backend.vit, backend.cfg
    n_layers = cfg.n_layers
    with torch.no_grad():
        run = backend.run(images, read=_sites(n_layers, tokens))
        acts, embed = run.acts, run.output
        final = acts[f"blocks.{n_layers - 1}.hook_resid_post"]
        D, const = _readout_map(backend)
        D = D.to(final)
        weights = backend.readout.token_weights(final.shape[1]).to(final)
        queries = weights.nonzero()[:, 0]
        scale = backend.readout.final_scale(final)[:, queries, 0]  # [batch, q]
        c = weights[queries] / scale  # what a unit write at each read token counts, per image

        def write(x: Tensor) -> Tensor:  # [batch, pos, d_model] -> [batch, embed]
            return torch.einsum("bq,bqd,ed->be", c, x[:, queries], D)

        heads, per_token, biases, mlps = [], [], [], []
        for i in range(n_layers):
            attn = vit.blocks[i].attn
            G = torch.einsum("hzd,ed->hze", attn.W_O.to(D), D)  # a head's z -> the embedding
            if tokens:
                pattern = acts[f"blocks.{i}.attn.hook_pattern"][:, :, queries]  # [b, h, q, s]
                a = torch.einsum("bq,bhqs->bhs", c, pattern)
                share = torch.einsum("bhs,bshz,hze->bhse", a, acts[f"blocks.{i}.attn.hook_v"], G)
                per_token.append(share)
                heads.append(share.sum(2))
            else:
                heads.append(torch.einsum("bq,bqhz,hze->bhe", c, acts[f"blocks.{i}.attn.hook_z"][:, queries], G))
            b_O = attn.b_O if attn.b_O is not None else D.new_zeros(D.shape[1])
            biases.append(c.sum(1, keepdim=True) * (D @ b_O.to(D)))
            mlps.append(write(acts[f"blocks.{i}.hook_mlp_out"]))
        embedding = write(acts["blocks.0.hook_resid_pre"])
        constant = const.to(D).expand(images.shape[0], -1)

    layout = layout_for(backend, images)
    meta = {"image_embedding": embed.detach(), "frozen": "final norm scale", "backend": backend.kind,
            "tokens": tokens}

    def make(name: str, values: Tensor, dims: tuple[str, ...]) -> AnalysisResult:
        return AnalysisResult(f"clip_decomposition/{name}", values, dims, layout, None, {}, meta)

    parts = {"attn_bias": make("attn_bias", torch.stack(biases, 1), ("batch", "layer", "embed")),
             "mlp": make("mlp", torch.stack(mlps, 1), ("batch", "layer", "embed")),
             "embedding": make("embedding", embedding, ("batch", "embed")),
             "constant": make("constant", constant, ("batch", "embed"))}
    if tokens:
        parts = {"token": make("token", torch.stack(per_token, 1), ("batch", "layer", "head", "token", "embed")),
                 **parts}
    result = AnalysisResult("clip_decomposition", torch.stack(heads, 1), ("batch", "layer", "head", "embed"),
                            layout, None, {}, meta, parts)
    check_identity(total_of(result), embed.detach(), lambda miss, size: (
        f"clip_decomposition: the parts sum to an embedding that misses clip.encode_image by {miss:.3g} (its "
        f"size {size:.3g}): the vision tower is not the pre-norm stack of attention and MLP blocks read through "
        "the final norm and the projection that the decomposition splits (a hook left on the tower, or a block "
        "that is not linear in its heads)"))
    return result


# ---------------------------------------------------------------------- text
def text_embeddings(clip: Any, texts: Sequence[str], method: str) -> Tensor:
    """Unit-norm text embeddings [n_texts, d_embed]; refuses an empty bank, non-strings and any
    text longer than the text tower's context (naming it), rather than truncating it."""
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, Tensor) or not isinstance(texts, Sequence):
        raise InputError(f"{method}: expected a list of texts (strings), got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise InputError(f"{method}: the text bank is empty; give at least one text")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise InputError(f"{method}: texts must be strings, got {type(bad[0]).__name__} ({bad[0]!r})")
    with warnings.catch_warnings():  # a long first text is refused below, by name
        warnings.simplefilter("ignore", UserWarning)
        clip.tokenize(texts[:1])  # builds the tokenizer where the model holds a factory
    tok = clip.tokenizer
    context = tok.context_length
    lengths = (tok.fn(texts, context_length=4 * context) != tok.pad_id).sum(-1).tolist()
    for text, n in zip(texts, lengths):
        if n > context:
            raise InputError(f"{method}: the text {text[:80]!r} is {'more than ' if n >= 4 * context else ''}{n} "
                             f"tokens long, longer than the text tower's context of {context} tokens; shorten it")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", UserWarning)
        return F.normalize(clip.encode_text(texts), dim=-1)


def decomposition_scores(result: AnalysisResult, clip: Any, texts: Sequence[str], *,
                         scale: str = "cosine") -> AnalysisResult:
    """Each part of a `clip_decomposition` dotted with the unit-norm text embeddings of `texts`
    (prompts or class names, embedded as given).

    `scale="cosine"` (default) divides by each image embedding's norm (frozen at its clean
    value), so the parts of an image sum to its cosine similarity with each text (CLIP's logit
    before exp(logit_scale)); `scale="dot"` leaves the image side unnormalised, so they sum to
    embedding . text_unit. Returns values [batch, layer, head, text] and the same parts as the
    decomposition with "embed" replaced by "text"; `meta["score"]` [batch, text] is their sum.
    """
    method = "decomposition_scores"
    if result.method != "clip_decomposition":
        raise InputError(f"{method}: expected the result of px.clip_decomposition, got {result.method!r}")
    if scale not in ("cosine", "dot"):
        raise InputError(f"{method}: scale must be 'cosine' or 'dot', got {scale!r}")
    text = text_embeddings(clip, texts, method)
    embed = result.meta["image_embedding"]
    norm = embed.norm(dim=-1) if scale == "cosine" else torch.ones_like(embed[:, 0])
    text = text.to(embed)
    names = list(texts) if not isinstance(texts, str) else [texts]

    def scored(r: AnalysisResult) -> AnalysisResult:
        values = (r.values @ text.T) / norm.reshape(-1, *[1] * (r.values.ndim - 1))
        dims = (*r.dims[:-1], "text")
        return AnalysisResult(r.method.replace("clip_decomposition", method), values, dims, r.layout, None,
                              {**r.coords, "text": names}, meta)

    score = (embed @ text.T) / norm[:, None]
    meta = {**{k: v for k, v in result.meta.items() if k != "max_error"}, "score": score, "texts": names,
            "scale": scale}
    parts = {name: scored(part) for name, part in result.parts.items()}
    out = scored(result)
    out.parts = parts
    total = total_of(out)
    check_identity(total, score, lambda miss, size: f"{method}: the parts' scores miss the score by {miss:.3g}")
    return out
