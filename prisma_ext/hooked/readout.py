"""The readout of a ViT: how its final residual stream becomes its output.

Which tokens pool with what weights (CLS, CLS and distillation averaged, the mean of the patches,
an attention pool), the final norm before or after pooling, the image projection, the head(s).
`HookedViT` runs its forward pass through it, and the analysis layer reads it for the logit lens,
direct logit attribution, the attention maps' query weights and patching's short last block:

    readout = model.readout
    readout.token_weights(n_tokens)          # [pos]: how the pooled vector weighs each token
    readout.class_directions(ids, n_tokens)  # the class logits as linear functions of the stream
    readout.token_logits(resid)              # every token read out as if it were the pooled one

"Normalised" below means centred (a LayerNorm; an RMSNorm does not centre) and divided by the
final norm's scale, with that scale frozen (TL's `apply_ln_to_stack`); a direction is what a
normalised vector is dotted with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PrismaError

if TYPE_CHECKING:  # pragma: no cover
    from .vit import HookedViT


class Readout:
    """The readout of one HookedViT (a view: it reads the model's current modules and config)."""

    def __init__(self, model: HookedViT):
        self.model = model

    @property
    def cfg(self):
        return self.model.cfg

    # ------------------------------------------------------------------ which tokens
    @property
    def pool_start(self) -> int:
        """The first token an average or attention pool reads (0 when it includes the prefix)."""
        return 0 if self.cfg.pool_include_prefix else self.cfg.n_prefix

    @property
    def query_tokens(self) -> int | None:
        """How many leading tokens the readout reads (CLS, and the distillation token), or None
        when it reads every token (average or attention pooling)."""
        return 1 + self.cfg.n_dist if self.cfg.global_pool == "token" else None

    @property
    def is_linear(self) -> bool:
        """Whether the output is linear in the normalised final residual stream: the pooled vector a
        fixed weighting of the tokens (not an attention pool) and the head a linear layer."""
        return self.cfg.global_pool != "map" and self.cfg.head_type == "linear"

    def require_linear(self, what: str) -> None:
        if self.cfg.global_pool == "map":
            raise PrismaError(
                f"{what}: this model pools tokens with an attention head (global_pool='map'), which "
                "is not linear in the residual stream; read `hook_pooled` or the attn_pool sites "
                "instead of residual directions")
        if self.cfg.head_type != "linear":
            raise PrismaError(
                f"{what} needs a linear head (a linear readout of the residual stream), and this model's head is "
                f"{type(self.model.head).__name__}; the logit lens, patching and the attention maps read through "
                "any head")

    @property
    def pools_linearly(self) -> bool:
        """Whether the pooled vector is a fixed weighting of the tokens (CLS, average)."""
        return self.cfg.global_pool != "map"

    def token_weights(self, n_tokens: int) -> Tensor:
        """How the pooled vector weighs each token [pos]: CLS one-hot (CLS and distillation 1/2
        each for a distilled model), or the average pool's uniform weights over its tokens."""
        if not self.pools_linearly:
            self.require_linear("token_weights")
        weights = torch.zeros(n_tokens)
        if self.cfg.global_pool == "token":
            weights[: 1 + self.cfg.n_dist] = 1.0 / (1 + self.cfg.n_dist)
        else:
            weights[self.pool_start:] = 1.0 / (n_tokens - self.pool_start)
        return weights

    # ------------------------------------------------------------------ the forward pass
    def pool(self, resid: Tensor) -> Tensor:
        """The model's own pooling of a final residual stream [batch, pos, d_model], final norm
        included (through the model's modules, so their hooks fire): [batch, d_model], or
        [batch, 2, d_model] (CLS, distillation) for a distilled model."""
        cfg, model = self.cfg, self.model
        if cfg.final_norm == "tokens":
            resid = model.ln_final(resid)
        if cfg.global_pool == "token":
            pooled = resid[:, : 1 + cfg.n_dist] if cfg.n_dist else resid[:, 0]
        elif cfg.global_pool == "avg":
            pooled = resid[:, self.pool_start:].mean(dim=1)
        else:
            pooled = model.attn_pool(resid[:, self.pool_start:])[:, 0]
        if cfg.final_norm == "pooled":
            pooled = model.ln_final(pooled.unsqueeze(1)).squeeze(1)
        return pooled

    def head(self, pooled: Tensor) -> Tensor:
        """Projection and head of pooled vectors [..., d_model] (distilled: [..., 2, d_model],
        the two heads averaged) -> [..., n_classes]."""
        model = self.model
        if self.cfg.d_proj:
            pooled = model.proj(pooled)
        if model.head is None:
            raise PrismaError("this model has no classifier head: for CLIP call clip.use_zero_shot_head(class_names) "
                              "first")
        if self.cfg.n_dist:
            return (model.head(pooled[..., 0, :]) + model.head_dist(pooled[..., 1, :])) / 2
        return model.head(pooled)

    # ------------------------------------------------------------------ the final norm
    def affine(self) -> tuple[Tensor | None, Tensor | None]:
        """The final norm's (weight, bias), or (None, None) when folded away or absent."""
        ln = getattr(self.model, "ln_final", None)
        if ln is None or ln.w is None:
            return None, None
        return ln.w, (ln.b if ln.b is not None else torch.zeros_like(ln.w))

    def normalize(self, x: Tensor) -> Tensor:
        """The final norm applied to vectors [..., d_model] (no hooks), or x without one."""
        ln = getattr(self.model, "ln_final", None)
        if ln is None:
            return x
        if not ln.center:
            return F.rms_norm(x, x.shape[-1:], ln.w, ln.eps)
        return F.layer_norm(x, x.shape[-1:], ln.w, ln.b, ln.eps)

    def final_scale(self, resid: Tensor) -> Tensor:
        """The final norm's scale sqrt(var + eps) per token [..., pos, 1] of a final residual
        stream [..., pos, d_model]; for a norm on the average-pooled vector, that vector's scale
        on every token; ones without a final norm."""
        cfg = self.cfg
        if cfg.final_norm == "none":
            return torch.ones_like(resid[..., :1])
        if cfg.final_norm == "pooled" and cfg.global_pool == "avg":
            pooled = resid[..., self.pool_start:, :].mean(-2, keepdim=True)
            return self._scale(pooled).expand_as(resid[..., :1])
        return self._scale(resid)

    def _scale(self, x: Tensor) -> Tensor:
        """sqrt(var + eps) for a LayerNorm, sqrt(mean square + eps) for an RMSNorm [..., 1]."""
        if self.cfg.norm_type == "rmsnorm":
            return (x.pow(2).mean(-1, keepdim=True) + self.cfg.eps_final).sqrt()
        return (x.var(-1, unbiased=False, keepdim=True) + self.cfg.eps_final).sqrt()

    def to_residual(self, directions: Tensor, scale: Tensor) -> Tensor:
        """Directions for normalised vectors [batch, pos, d] -> directions for the raw residual
        stream: centred (with a final norm, centring is a projection, so it moves onto the
        direction) and divided by the frozen scale [batch, pos, 1]."""
        if self.cfg.final_norm != "none" and self.cfg.norm_type != "rmsnorm":
            directions = directions - directions.mean(-1, keepdim=True)
        return directions / scale

    # ------------------------------------------------------------------ linear readouts
    def unembed(self) -> tuple[Tensor, Tensor]:
        """(W_U [d_model, n_classes], b_U [n_classes]): projection and head composed, reading
        the final norm's output."""
        if self.cfg.head_type != "linear":
            self.require_linear("the unembedding W_U")
        layers = [m for m in (getattr(self.model, "proj", None), self.model.head) if m is not None]
        if not layers:
            raise PrismaError("this model has no head or projection after pooling: no unembedding")
        W, b = layers[0].weight.T, layers[0].bias
        for layer in layers[1:]:
            W, b = W @ layer.weight.T, b @ layer.weight.T + layer.bias
        return W, b

    def spread(self, u: Tensor, const: Tensor, n_tokens: int | None = None) -> tuple[Tensor, Tensor]:
        """A linear function of the pooled vector after the final norm, `u . pooled + const`
        (u [batch, d_model]), as per-token directions for normalised tokens [batch, pos, d_model]
        and a constant [batch]."""
        if self.cfg.n_dist:
            raise PrismaError("a distilled model reads two tokens with two heads: use its class logits")
        weights = self.token_weights(n_tokens or self.cfg.layout.n_tokens).to(u)
        w, b = self.affine()
        direction = u * w if w is not None else u
        if b is not None:
            const = const + u @ b
        return weights[None, :, None] * direction[:, None, :], const

    def class_directions(self, ids: Tensor, n_tokens: int | None = None) -> tuple[Tensor, Tensor]:
        """The logit of class `ids[i]` as per-token directions for normalised tokens
        [*ids.shape, pos, d_model] and a constant [*ids.shape], such that
        `logit = sum_pos normalised[pos] . directions[pos] + constant`. A distilled model: the
        CLS head at token 0 and the distillation head at token 1, each weighted 1/2."""
        self.require_linear("class_directions")
        cfg = self.cfg
        n_tokens = n_tokens or cfg.layout.n_tokens
        W_U, b_U = self.unembed()
        flat = ids.reshape(-1).to(W_U.device)
        if not cfg.n_dist:
            directions, const = self.spread(W_U[:, flat].T, b_U[flat], n_tokens)
        else:
            w, b = self.affine()
            directions = W_U.new_zeros(flat.shape[0], n_tokens, cfg.d_model)
            const = W_U.new_zeros(flat.shape[0])
            heads = [(W_U, b_U), (self.model.head_dist.weight.T, self.model.head_dist.bias)]
            for pos, (W, bias) in enumerate(heads):
                u = W[:, flat].T / 2
                directions[:, pos] = u * w if w is not None else u
                const = const + bias[flat] / 2 + (u @ b if b is not None else 0)
        return directions.reshape(*ids.shape, n_tokens, cfg.d_model), const.reshape(ids.shape)

    def pooled_directions(self, ids: Tensor) -> Tensor:
        """The direction of each class for a normalised pooled vector [*ids.shape, d_model]
        (W_U's column, the final norm's weight multiplied in when it is not folded)."""
        self.require_linear("pooled_directions")
        W_U, _ = self.unembed()
        w, _ = self.affine()
        W = W_U if w is None else w[:, None] * W_U
        return W[:, ids.to(W.device)].movedim(0, -1)

    # ------------------------------------------------------------------ reading any layer
    def token_logits(self, resid: Tensor) -> Tensor:
        """Each token read out as if it were the pooled token [..., pos, n_classes] from residual
        streams [..., pos, d_model]: final norm, (attention pool of that token alone), projection,
        head (a distilled model: both heads, averaged)."""
        cfg = self.cfg
        x = self.normalize(resid) if cfg.final_norm == "tokens" else resid
        if cfg.global_pool == "map":
            shape = x.shape
            x = self.model.attn_pool(x.reshape(-1, 1, shape[-1]))[:, 0].reshape(shape)
        if cfg.final_norm == "pooled":
            x = self.normalize(x)
        if cfg.n_dist:
            x = torch.stack([x, x], dim=-2)
        return self.head(x)

    def pooled_logits(self, resid: Tensor) -> Tensor:
        """The model's own readout [batch, n_classes] of a residual stream [batch, pos, d_model]:
        at the last layer, the model's logits."""
        return self.head(self.pool(resid))

    def query_weights(self, resid: Tensor) -> Tensor:
        """How much the readout draws on each token [batch, pos]: the pooling weights; for an
        attention pool, its attention from the first latent query (mean over heads), computed
        from the final residual stream [batch, pos, d_model]."""
        cfg = self.cfg
        batch, n_tokens, _ = resid.shape
        if self.pools_linearly:
            return self.token_weights(n_tokens).to(resid).expand(batch, -1)
        x = self.normalize(resid) if cfg.final_norm == "tokens" else resid
        pattern = self.model.attn_pool.pattern(x[:, self.pool_start:])  # [batch, head, latent, pos]
        weights = resid.new_zeros(batch, n_tokens)
        weights[:, self.pool_start:] = pattern[:, :, 0].mean(1)
        return weights
