"""The latent-query attention-pooling head (timm's `AttentionPoolLatent`, SigLIP's `map` pooling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .layers import MLP
from .norms import NormSpec, is_hooked, make_norm


class AttentionPool(nn.Module):
    """Learned latent queries attend over the tokens, then proj, norm and a residual MLP.

    Sites: `hook_pattern` [batch, head, latent, pos], `hook_z` [batch, latent, head, d_head],
    `hook_out` [batch, latent, d_model] (after the MLP).
    """

    def __init__(self, d_model: int, n_heads: int, latent_len: int, d_mlp: int, act_fn: str,
                 eps: float, has_norm: bool, norm_type: str = "layernorm"):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.latent = nn.Parameter(torch.zeros(latent_len, d_model))
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm = make_norm(NormSpec(norm_type, eps), d_model) if has_norm else None
        self.mlp = MLP(d_model, d_mlp, act_fn)
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        self.hook_out = HookPoint()

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [batch, head, latent, d_head] from the latents; k, v [batch, head, pos, d_head] from x."""
        batch, pos, _ = x.shape
        latent_len = self.latent.shape[0]
        q = self.q(self.latent).view(1, latent_len, self.n_heads, self.d_head).transpose(1, 2)
        k, v = self.kv(x).view(batch, pos, 2, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        return q.expand(batch, -1, -1, -1), k, v

    def pattern(self, x: Tensor) -> Tensor:
        """The latents' attention over the tokens x [batch, pos, d_model]: [batch, head, latent, pos]."""
        q, k, _ = self._qkv(x)
        return ((q @ k.transpose(-2, -1)) * self.d_head ** -0.5).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        batch, pos, d = x.shape
        latent_len = self.latent.shape[0]
        q, k, v = self._qkv(x)
        if is_hooked(self.hook_pattern):
            scores = (q @ k.transpose(-2, -1)) * self.d_head ** -0.5
            z = self.hook_pattern(scores.softmax(dim=-1)) @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v)
        z = self.hook_z(z.transpose(1, 2))
        out = self.proj(z.reshape(batch, latent_len, d))
        normed = self.norm(out) if self.norm is not None else out
        return self.hook_out(out + self.mlp(normed))
