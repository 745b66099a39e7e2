"""The model's readout (final norm, pooling, projection, head) applied to residual streams.

Everything here works from residual-stream tensors and the weights of `backend.vit`, so it
gives the same numbers on either backend. The final norm's scale is recomputed from the
residual stream (the nnsight backend has no `hook_scale` site).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PrismaError


def _pool_start(cfg) -> int:
    return 0 if cfg.pool_include_prefix else cfg.n_prefix


def linear_pool_weights(cfg, n_tokens: int) -> Tensor:
    """How the pooled vector weighs each token [pos]: CLS one-hot (CLS and distillation 1/2 each
    for a distilled model), or the average pool's uniform weights."""
    weights = torch.zeros(n_tokens)
    if cfg.global_pool == "token":
        weights[: 1 + cfg.n_dist] = 1.0 / (1 + cfg.n_dist)
    elif cfg.global_pool == "avg":
        start = _pool_start(cfg)
        weights[start:] = 1.0 / (n_tokens - start)
    else:
        raise PrismaError("this model pools with an attention head (global_pool='map'): not linear")
    return weights


def final_scale(cfg, resid: Tensor) -> Tensor:
    """The final norm's scale sqrt(var + eps) per token [..., pos, 1] of a final residual stream
    [..., pos, d_model]; for a norm on the average-pooled vector, that vector's scale on every
    token; ones without a final norm."""
    if cfg.final_norm == "none":
        return torch.ones_like(resid[..., :1])
    if cfg.final_norm == "pooled" and cfg.global_pool == "avg":
        pooled = resid[..., _pool_start(cfg):, :].mean(-2, keepdim=True)
        return ((pooled.var(-1, unbiased=False, keepdim=True) + cfg.eps_final).sqrt()).expand_as(resid[..., :1])
    return (resid.var(-1, unbiased=False, keepdim=True) + cfg.eps_final).sqrt()


def residual_directions(cfg, directions: Tensor, scale: Tensor) -> Tensor:
    """Readout directions [batch, pos, d] for the raw residual stream: centred (when there is a
    final norm, centring is a projection so it moves onto the direction) and divided by the
    frozen scale [batch, pos, 1]. Then `score = sum_pos resid . result + constant`."""
    if cfg.final_norm != "none":
        directions = directions - directions.mean(-1, keepdim=True)
    return directions / scale


def pooled_functional_readout(vit, u: Tensor, const: Tensor) -> tuple[Tensor, Tensor]:
    """A linear function of the pooled vector after the final norm, `u . pooled + const`
    (u [batch, d_model]), as per-token directions [batch, pos, d_model] and a constant [batch],
    in the convention of `HookedViT.token_readout`."""
    cfg = vit.cfg
    if cfg.n_dist:
        raise PrismaError("a distilled model reads two tokens with two heads: use its class logits")
    weights = linear_pool_weights(cfg, cfg.layout.n_tokens).to(u)
    w, b = vit._final_affine()
    direction = u * w if w is not None else u
    if b is not None:
        const = const + u @ b
    return weights[None, :, None] * direction[:, None, :], const


def class_readout(vit, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The logit of class `ids[i]` for image i as per-token directions [batch, pos, d_model] and
    a constant [batch], in the convention of `HookedViT.token_readout` (which it matches), built
    on the weights' device. A distilled model: the CLS head at token 0 and the distillation
    head at token 1, each weighted 1/2."""
    cfg = vit.cfg
    W_U, b_U = vit.W_U, vit.b_U
    ids = ids.to(W_U.device)
    if not cfg.n_dist:
        return pooled_functional_readout(vit, W_U[:, ids].T, b_U[ids])
    w, b = vit._final_affine()
    directions = W_U.new_zeros(ids.shape[0], cfg.layout.n_tokens, cfg.d_model)
    const = W_U.new_zeros(ids.shape[0])
    for pos, (W, bias) in enumerate([(W_U, b_U), (vit.W_U_dist, vit.b_U_dist)]):
        u = W[:, ids].T / 2
        directions[:, pos] = u * w if w is not None else u
        const = const + bias[ids] / 2 + (u @ b if b is not None else 0)
    return directions, const


def _head(vit, pooled: Tensor) -> Tensor:
    """Projection and head of pooled vectors [..., d_model] (distilled: [..., 2, d_model])."""
    if vit.cfg.d_proj:
        pooled = vit.proj(pooled)
    if vit.head is None:
        raise PrismaError("this model has no classifier head: for CLIP call clip.use_zero_shot_head(class_names) "
                          "first")
    if vit.cfg.n_dist:
        return (vit.head(pooled[..., 0, :]) + vit.head_dist(pooled[..., 1, :])) / 2
    return vit.head(pooled)


def _norm(vit, x: Tensor) -> Tensor:
    ln = getattr(vit, "ln_final", None)
    if ln is None:
        return x
    return F.layer_norm(x, x.shape[-1:], ln.w, ln.b, ln.eps)


def token_logits(vit, resid: Tensor) -> Tensor:
    """Each token read out as if it were the pooled token [..., pos, n_classes] from residual
    streams [..., pos, d_model]: final norm, (attention pool of that token alone), projection,
    head (a distilled model: both heads, averaged)."""
    cfg = vit.cfg
    x = _norm(vit, resid) if cfg.final_norm == "tokens" else resid
    if cfg.global_pool == "map":
        shape = x.shape
        x = vit.attn_pool(x.reshape(-1, 1, shape[-1]))[:, 0].reshape(shape)
    if cfg.final_norm == "pooled":
        x = _norm(vit, x)
    if cfg.n_dist:
        x = torch.stack([x, x], dim=-2)
    return _head(vit, x)


def pooled_logits(vit, resid: Tensor) -> Tensor:
    """The model's own readout [batch, n_classes] of a residual stream [batch, pos, d_model]:
    at the last layer, the model's logits."""
    return _head(vit, vit._pool(resid))


def query_weights(vit, resid: Tensor) -> Tensor:
    """How much the readout draws on each token [batch, pos]: the pooling weights; for an
    attention-pool head, its attention from the first latent query (mean over heads),
    computed from the final residual stream [batch, pos, d_model]."""
    cfg = vit.cfg
    batch, n_tokens, _ = resid.shape
    if cfg.global_pool != "map":
        return linear_pool_weights(cfg, n_tokens).to(resid).expand(batch, -1)
    pool = vit.attn_pool
    x = _norm(vit, resid) if cfg.final_norm == "tokens" else resid
    start = _pool_start(cfg)
    x = x[:, start:]
    q = pool.q(pool.latent[:1]).view(1, pool.n_heads, pool.d_head)
    k = pool.kv(x)[..., : pool.n_heads * pool.d_head].view(batch, -1, pool.n_heads, pool.d_head)
    pattern = (torch.einsum("hd,bkhd->bhk", q[0], k) * pool.d_head ** -0.5).softmax(-1).mean(1)
    weights = resid.new_zeros(batch, n_tokens)
    weights[:, start:] = pattern
    return weights
