"""A sparse autoencoder over one site's activations, with SAELens's parameters, math and hook names.

    sae = SparseAutoencoder(d_in=768, d_sae=12288, architecture="topk", k=64)
    acts = sae.encode(x)            # [..., d_sae]
    recon = sae.decode(acts)        # [..., d_in]
    out = sae(x)                    # decode(encode(x)), plus the error term if use_error_term

Parameters (SAELens 6.x names and shapes): `W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec`
[d_sae, d_in] (each row one latent's direction), `b_dec` [d_in], and for "jumprelu" a plain
`threshold` [d_sae]. Architectures:
- "standard": acts = ReLU(pre), pre = (x - b_dec) @ W_enc + b_enc (b_dec subtracted when
  `apply_b_dec_to_input`, SAELens's default);
- "topk": the k largest of pre kept, then ReLU on them (so fewer than k may be non-zero);
- "jumprelu": acts = ReLU(pre) where pre > threshold (strict), else 0.
Decoding is acts @ W_dec + b_dec for all three. Hook points, as SAELens names them:
`hook_sae_input` (the raw input), `hook_sae_acts_pre`, `hook_sae_acts_post`, `hook_sae_recons`,
`hook_sae_error` (input minus a clean reconstruction, without gradient) and `hook_sae_output`.
`normalize_activations`: "none", or SAELens's and ViT-Prisma's run-time "layer_norm" and
"constant_norm_rescale" (applied after `hook_sae_input`, undone after `hook_sae_recons`). Other
SAELens architectures (gated, transcoders, ...) are refused by name where a checkpoint asks for
them (`prisma_ext.sae.formats`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from ..errors import InputError

ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")  # applied at run time, undone on the output
LN_EPS = 1e-5
SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
             "hook_sae_output")  # SAELens's names, in forward order


class SparseAutoencoder(HookedRootModule):
    """An SAE of width `d_sae` over `d_in`-wide activations (see the module docstring)."""

    def __init__(self, d_in: int, d_sae: int, architecture: str = "standard", k: int | None = None,
                 apply_b_dec_to_input: bool = True, use_error_term: bool = False,
                 normalize_activations: str = "none", dtype: torch.dtype = torch.float32):
        super().__init__()
        if normalize_activations not in NORMALIZATIONS:
            raise InputError(f"SAE normalize_activations {normalize_activations!r} is not supported; supported: "
                             f"{', '.join(NORMALIZATIONS)}")
        self.normalize_activations = normalize_activations
        self._stats: tuple[Tensor, Tensor] | None = None  # the last encode's normalisation (SAELens keeps it too)
        if architecture not in ARCHITECTURES:
            raise InputError(f"SAE architecture {architecture!r} is not supported; supported: "
                             f"{', '.join(ARCHITECTURES)}")
        for name, value in (("d_in", d_in), ("d_sae", d_sae)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"SAE {name} must be a positive int, got {value!r}")
        if architecture == "topk" and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae):
            raise InputError(f"a topk SAE needs k, an int in [1, d_sae={d_sae}], got {k!r}")
        self.d_in, self.d_sae, self.architecture = d_in, d_sae, architecture
        self.k = k if architecture == "topk" else None
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.use_error_term = use_error_term
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        for name in SAE_HOOKS:
            setattr(self, name, HookPoint())
        self.setup()

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.shape[-1:] != (self.d_in,):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"SAE input: expected [..., d_in={self.d_in}], got {shape}")

    def normalize(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The run-time normalisation of x and what undoes it: "layer_norm" (per token: minus the
        mean, over the unbiased std + 1e-5; undone as x * std + mean, as SAELens and ViT-Prisma
        do) or "constant_norm_rescale" (to norm sqrt(d_in)); (x, None) for "none"."""
        if self.normalize_activations == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return (x - mu) / (std + LN_EPS), (std, mu)
        if self.normalize_activations == "constant_norm_rescale":
            coeff = self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
            return x * coeff, (1 / coeff, torch.zeros_like(coeff))
        return x, None

    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations [..., d_sae] of activations x [..., d_in] (the normalisation, if any, is
        kept for the next `decode`, as SAELens does)."""
        self._check(x)
        x = self.hook_sae_input(x.to(self.W_enc.dtype))
        x, self._stats = self.normalize(x)
        sae_in = x - self.b_dec if self.apply_b_dec_to_input else x
        return self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)

    def activate(self, pre: Tensor) -> Tensor:
        """The architecture's activation of pre-activations [..., d_sae]."""
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations [..., d_sae] of x [..., d_in]."""
        return self.hook_sae_acts_post(self.activate(self.encode_pre(x)))

    def decode(self, acts: Tensor) -> Tensor:
        """The reconstruction [..., d_in] of latent activations [..., d_sae] (with a run-time
        normalisation: undone with the statistics of the last `encode`)."""
        if not isinstance(acts, Tensor) or acts.shape[-1:] != (self.d_sae,):
            shape = tuple(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
            raise InputError(f"SAE latents: expected [..., d_sae={self.d_sae}], got {shape}")
        return self._denormalize(self.hook_sae_recons(acts @ self.W_dec + self.b_dec))

    def _denormalize(self, recon: Tensor) -> Tensor:
        if self.normalize_activations == "none":
            return recon
        if self._stats is None or self._stats[0].shape[:-1] != recon.shape[:-1]:
            raise InputError(f"this SAE normalises its input ({self.normalize_activations}): decode the latents of "
                             "the last encode (their statistics undo the normalisation), or call the SAE itself")
        scale, shift = self._stats
        return recon * scale + shift

    def forward(self, x: Tensor) -> Tensor:
        """decode(encode(x)); with `use_error_term`, plus x minus a clean reconstruction (no
        hooks, no gradient), so that without an edit the output is x itself."""
        out = self.decode(self.encode(x))
        if self.use_error_term:
            with torch.no_grad():
                clean = self._plain_reconstruction(x)
            out = out + self.hook_sae_error(x.to(out.dtype) - clean)
        return self.hook_sae_output(out)

    def _plain_reconstruction(self, x: Tensor) -> Tensor:
        """decode(encode(x)) without any hook (edits on the latents do not reach it)."""
        normed, stats = self.normalize(x.to(self.W_enc.dtype))
        pre = (normed - self.b_dec if self.apply_b_dec_to_input else normed) @ self.W_enc + self.b_enc
        recon = self.activate(pre) @ self.W_dec + self.b_dec
        return recon if stats is None else recon * stats[0] + stats[1]

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}, architecture={self.architecture!r}{k}"
