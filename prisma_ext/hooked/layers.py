"""Hooked building blocks: attention, the MLP (plain or gated) and the pre-norm block (norms are
in `norms.py`).

Hook names follow TransformerLens. Each layer takes a fast path (fused kernels) when none of
the hook points that the fused kernel would skip has a hook attached, and the explicit path,
computing and passing every intermediate through its hook point, when one has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.FactoredMatrix import FactoredMatrix
from transformer_lens.hook_points import HookPoint

from ..errors import PrismaError
from .norms import NormSpec, is_hooked, make_norm
from .rotary import apply_rotary

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "mish": F.mish,
    "sigmoid": torch.sigmoid,
}


class CircuitViews:
    """TL's factored circuits from `W_Q/W_K/W_V/W_O` (per layer, or stacked over layers)."""

    @property
    def QK(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_V, self.W_O)


class Attention(CircuitViews, nn.Module):
    """Multi-head self-attention with fused qkv and output projections (nn.Linear layout).

    Sites: `hook_q/k/v` and `hook_z` [batch, pos, head, d_head]; `hook_attn_scores` and
    `hook_pattern` [batch, head, query, key]; `hook_result` [batch, pos, head, d_model] when
    `use_attn_result`. `causal` masks future keys (the text tower). With `qk_norm`, `q_norm` /
    `k_norm` normalise each head's query and key (their `hook_normalized` is what the scores read;
    `hook_q`/`hook_k` are the projections' outputs); with `out_norm`, `norm` normalises the heads'
    concatenated outputs before the output projection (timm's scale_attn_norm). With `rotary`
    ("interleaved" or "half", see `rotary.py`), the patch tokens' queries and keys are rotated
    after any qk-norm: `hook_rot_q`/`hook_rot_k` [batch, pos, head, d_head] are what the scores
    read, `hook_q`/`hook_k` stay the projections' outputs (TL's rotary convention); the first
    `n_prefix` tokens are not rotated.
    TL weight views: `W_Q/W_K/W_V` [head, d_model, d_head], `W_O`
    [head, d_head, d_model], biases `b_Q/b_K/b_V` [head, d_head] and `b_O` [d_model].
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int, use_attn_result: bool = False,
                 causal: bool = False, scale: float | None = None, qk_norm: NormSpec | None = None,
                 out_norm: NormSpec | None = None, rotary: str = "none", n_prefix: int = 0):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        self.rotary, self.n_prefix = rotary, n_prefix
        self.scale = d_head ** -0.5 if scale is None else scale
        self.use_attn_result = use_attn_result
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * n_heads * d_head)
        self.q_norm = make_norm(qk_norm, d_head) if qk_norm else None
        self.k_norm = make_norm(qk_norm, d_head) if qk_norm else None
        self.norm = make_norm(out_norm, n_heads * d_head) if out_norm else None
        self.proj = nn.Linear(n_heads * d_head, d_model)
        for name in ("q", "k", "v", "attn_scores", "pattern", "z", "result"):
            setattr(self, f"hook_{name}", HookPoint())
        if rotary != "none":
            self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()

    # -- TransformerLens weight views (they share storage with the parameters) --
    def _qkv_rows(self, i: int) -> slice:
        hd = self.n_heads * self.d_head
        return slice(i * hd, (i + 1) * hd)

    def _w_in(self, i: int) -> Tensor:
        w = self.qkv.weight[self._qkv_rows(i)]
        return w.view(self.n_heads, self.d_head, -1).transpose(1, 2)

    def _b_in(self, i: int) -> Tensor:
        return self.qkv.bias[self._qkv_rows(i)].view(self.n_heads, self.d_head)

    W_Q = property(lambda self: self._w_in(0))
    W_K = property(lambda self: self._w_in(1))
    W_V = property(lambda self: self._w_in(2))
    b_Q = property(lambda self: self._b_in(0))
    b_K = property(lambda self: self._b_in(1))
    b_V = property(lambda self: self._b_in(2))
    W_O = property(lambda self: self.proj.weight.T.view(self.n_heads, self.d_head, -1))
    b_O = property(lambda self: self.proj.bias)

    def forward(self, x: Tensor, n_query: int | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [batch, pos, d_model] -> [batch, pos, d_model]. `n_query`: only the first n_query
        tokens attend (keys and values still come from every token); the output and the sites
        from `attn_scores` on then hold those n_query rows. `rotary`: this layer's (sin, cos)
        [n_patches, heads or 1, d_head], for a rotary attention."""
        batch, pos, _ = x.shape
        if n_query is not None and self.causal:
            raise PrismaError("internal: n_query is for bidirectional attention only")
        qkv = self.qkv(x).view(batch, pos, 3, self.n_heads, self.d_head)
        q, k, v = (hp(t) for hp, t in zip((self.hook_q, self.hook_k, self.hook_v), qkv.unbind(2)))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary != "none":
            if rotary is None:
                raise PrismaError("internal: a rotary attention needs its (sin, cos) tables")
            q = self.hook_rot_q(apply_rotary(q, *rotary, self.n_prefix, self.rotary))
            k = self.hook_rot_k(apply_rotary(k, *rotary, self.n_prefix, self.rotary))
        if n_query is not None:
            q = q[:, :n_query]
        if is_hooked(self.hook_attn_scores, self.hook_pattern):
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
            if self.causal:
                future = torch.ones(pos, pos, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            pattern = self.hook_pattern(self.hook_attn_scores(scores).softmax(dim=-1))
            z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        else:
            z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=self.causal, scale=self.scale)
            z = z.transpose(1, 2)
        z = self.hook_z(z)
        if self.use_attn_result:
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            return result.sum(dim=-2) + self.proj.bias
        z = z.reshape(batch, z.shape[1], self.n_heads * self.d_head)
        return self.proj(self.norm(z) if self.norm is not None else z)


class MLP(nn.Module):
    """The MLP: plain (`fc1`, activation, `fc2`) or gated (`gate` and `fc1` in parallel, the
    activation of the gate times the linear branch, TL's gated MLP), optionally normalised before
    `fc2` (`norm`: EVA-02's and timm's scale_mlp_norm).

    Sites [batch, pos, d_mlp]: `hook_pre` (the activation's input: `fc1`'s output, or in a gated
    MLP the gate's), `hook_pre_linear` (gated: the linear branch `fc1`), `hook_post` (what `fc2`, or
    the norm, reads). TL's weight views: `W_in` [d_model, d_mlp], `b_in`, `W_gate` (gated),
    `W_out` [d_mlp, d_model], `b_out`.
    """

    def __init__(self, d_model: int, d_mlp: int, act_fn: str, gated: bool = False, norm: NormSpec | None = None):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.gate = nn.Linear(d_model, d_mlp) if gated else None
        self.norm = make_norm(norm, d_mlp) if norm else None
        self.fc2 = nn.Linear(d_mlp, d_model)
        self.act = ACTIVATIONS[act_fn]
        self.hook_pre = HookPoint()
        if gated:
            self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    W_in = property(lambda self: self.fc1.weight.T)
    b_in = property(lambda self: self.fc1.bias)
    W_gate = property(lambda self: self.gate.weight.T)
    b_gate = property(lambda self: self.gate.bias)
    W_out = property(lambda self: self.fc2.weight.T)
    b_out = property(lambda self: self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is None:
            post = self.hook_post(self.act(self.hook_pre(self.fc1(x))))
        else:
            post = self.hook_post(self.act(self.hook_pre(self.gate(x))) * self.hook_pre_linear(self.fc1(x)))
        return self.fc2(self.norm(post) if self.norm is not None else post)


class Block(nn.Module):
    """Pre-norm block. Sites: `hook_resid_pre/mid/post`, `hook_attn_out`, `hook_mlp_out`
    [batch, pos, d_model]; `attn_out`/`mlp_out` are what is added to the residual stream
    (layer scale already folded into the output projections)."""

    def __init__(self, cfg, causal: bool = False):
        super().__init__()
        block_norm = NormSpec(cfg.norm_type, cfg.eps, affine=not cfg.fold_ln)
        inner = NormSpec(cfg.norm_type, cfg.eps)
        self.ln1 = make_norm(block_norm, cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.use_attn_result, causal, cfg.attn_scale,
                              qk_norm=inner if cfg.qk_norm else None, out_norm=inner if cfg.attn_norm else None,
                              rotary=getattr(cfg, "rotary", "none"), n_prefix=getattr(cfg, "n_prefix", 0))
        self.ln2 = make_norm(block_norm, cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, gated=cfg.gated_mlp, norm=inner if cfg.mlp_norm else None)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, resid: Tensor, n_query: int | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """resid [batch, pos, d_model] -> [batch, pos, d_model]; with `n_query`, only the first
        n_query tokens are carried past the attention (all tokens still serve as keys and values):
        -> [batch, n_query, d_model], for a readout that reads only those tokens. `rotary`: the
        attention's (sin, cos) tables for this layer, in a rotary model."""
        resid = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid), n_query, rotary))
        if n_query is not None:
            resid = resid[:, :n_query]
        resid = self.hook_resid_mid(resid + attn_out)
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))
