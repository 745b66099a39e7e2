"""HookedTextTransformer: CLIP's text tower with TransformerLens hook points."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..errors import InputError, PrismaError, UnsupportedModelError
from .config import HOOKED_TEXT_POOLS, TextConfig
from .layers import Block
from .norms import NormSpec, make_norm
from .processing import process_text_weights
from .root import CheckedHookedRoot, TowerWeightViews
from .weights import TextWeights, detached_copy


class HookedTextTransformer(CheckedHookedRoot, TowerWeightViews):
    """Token ids [batch, pos] -> text embeddings [batch, d_proj].

    Sites: `hook_embed` and `hook_pos_embed` [batch, pos, d_model] (their sum enters the residual
    stream), the TL block sites (`blocks.{i}.hook_resid_pre`, `attn.hook_pattern`, ...; attention
    is causal unless the config says otherwise), `ln_final.hook_scale/hook_normalized`,
    `hook_pooled` [batch, d_model] (the pooled position after the final norm) and
    `hook_text_embed` [batch, d_proj].
    """

    def __init__(self, cfg: TextConfig):
        if cfg.pool not in HOOKED_TEXT_POOLS:
            raise UnsupportedModelError(f"text pooling {cfg.pool!r} is not supported by the hooked text tower "
                                        f"(it pools by {', '.join(HOOKED_TEXT_POOLS)})")
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.d_model))
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(Block(cfg, causal=cfg.causal) for _ in range(cfg.n_layers))
        self.ln_final = make_norm(NormSpec(cfg.norm_type, cfg.eps_final, not cfg.fold_ln), cfg.d_model)
        self.hook_pooled = HookPoint()
        self.proj = nn.Linear(cfg.d_model, cfg.d_proj) if cfg.d_proj else None
        self.hook_text_embed = HookPoint()
        self.setup()

    @classmethod
    def from_weights(cls, cfg: TextConfig, weights: TextWeights) -> HookedTextTransformer:
        weights = detached_copy(weights, dtype=cfg.dtype)
        process_text_weights(weights, cfg)
        model = cls(cfg)
        from .load_weights import load_text_into

        load_text_into(model, weights)
        return model.to(device=cfg.device, dtype=cfg.dtype).eval()

    def pool_positions(self, tokens: Tensor) -> Tensor:
        """The position each sequence is pooled at [batch]."""
        cfg = self.cfg
        if cfg.pool == "argmax":
            return tokens.argmax(dim=-1)
        if cfg.pool == "eos":
            return (tokens == cfg.eos_id).int().argmax(dim=-1)
        fixed = 0 if cfg.pool == "first" else tokens.shape[1] - 1
        return torch.full((tokens.shape[0],), fixed, dtype=torch.long, device=tokens.device)

    def check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise InputError("expected token ids as an integer tensor [batch, pos] (use clip.tokenize)")
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise InputError(f"expected token ids of shape [batch, pos], got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.context_length:
            raise InputError(f"{tokens.shape[1]} tokens exceed the context length {self.cfg.context_length}")
        if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
            raise InputError(f"token ids must lie in [0, {self.cfg.vocab_size}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    def forward(self, tokens: Tensor, return_type: str | None = "embeds") -> Tensor | None:
        """`return_type`: "embeds" ([batch, d_proj]), "pooled" ([batch, d_model]), "resid"
        (the final residual stream [batch, pos, d_model]) or None."""
        if return_type not in ("embeds", "pooled", "resid", None):
            raise PrismaError(f"return_type must be 'embeds', 'pooled', 'resid' or None, got {return_type!r}")
        self.check_tokens(tokens)
        batch, pos = tokens.shape
        resid = self.hook_embed(self.token_embed(tokens)) + self.hook_pos_embed(
            self.pos_embed[:pos].expand(batch, -1, -1))
        return self.run_from(resid, 0, tokens, return_type)

    def run_from(self, resid: Tensor, layer: int, tokens: Tensor, return_type: str | None = "embeds"
                 ) -> Tensor | None:
        """Continue a forward pass from `blocks.{layer}.hook_resid_pre` = resid [batch, pos, d_model];
        `tokens` [batch, pos] say where to pool."""
        for block in self.blocks[layer:]:
            resid = block(resid)
        if return_type == "resid":
            return resid
        normed = self.ln_final(resid)
        rows = torch.arange(resid.shape[0], device=resid.device)
        pooled = self.hook_pooled(normed[rows, self.pool_positions(tokens)])
        if return_type == "pooled" or self.proj is None:
            return pooled
        embeds = self.hook_text_embed(self.proj(pooled))
        return embeds if return_type == "embeds" else None

    def example_tokens(self, batch_size: int = 1) -> Tensor:
        """Token ids [batch, context] with an end-of-text token where this tower pools."""
        cfg = self.cfg
        tokens = torch.zeros(batch_size, cfg.context_length, dtype=torch.long, device=self.pos_embed.device)
        end = {"argmax": cfg.vocab_size - 1, "eos": cfg.eos_id}.get(cfg.pool)
        if end is not None:
            tokens[:, 1] = end
        return tokens

    def site_shapes(self, batch_size: int = 1) -> dict[str, tuple[int, ...]]:
        """Every site name with its activation shape, from one forward pass."""
        with torch.no_grad():
            _, cache = self.run_with_cache(self.example_tokens(batch_size), return_cache_object=False)
        return {name: tuple(t.shape) for name, t in cache.items()}

    def summary(self) -> str:
        cfg = self.cfg
        return (f"text tower: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, d_mlp "
                f"{cfg.d_mlp}, act {cfg.act_fn}, vocab {cfg.vocab_size}, context {cfg.context_length}, "
                f"{'causal' if cfg.causal else 'bidirectional'}, pooled at {cfg.pool}, projection to {cfg.d_proj}")

    @property
    def W_E(self) -> Tensor:
        return self.token_embed.weight

    @property
    def W_pos(self) -> Tensor:
        return self.pos_embed
