"""What each SAE architecture minimises while training, and the SAE it leaves for inference.

- "topk" (Gao et al. 2024): the k largest pre-activations per row, ReLU on them; loss = the
  normalised MSE + `aux_coefficient` x AuxK (the residual error reconstructed from the `aux_k`
  largest pre-activations of the dead latents, over the error's variance).
- "batchtopk" (Bussmann et al. 2024): the k x batch largest ReLU pre-activations over the whole
  batch (rows get a varying number of latents), the same MSE + AuxK; the threshold it implies
  (the smallest kept activation) is averaged over training (an exponential moving average) and
  the SAE it returns is a JumpReLU with that threshold on every latent, as SAELens saves it.
- "jumprelu" (Rajamanoharan et al. 2024): acts = pre where pre > threshold (threshold =
  exp(log_threshold) per latent, trained), loss = the normalised MSE + `l0_coefficient` x the
  mean L0, with the paper's straight-through pseudo-derivatives for the threshold (a rectangle
  kernel of width `bandwidth`). No auxiliary loss (the method has none); dead latents are tracked.
- `prefixes` (Matryoshka, Bussmann et al. 2025; for topk and batchtopk): the MSE is averaged over
  reconstructions from the first m latents for each m in `prefixes` (d_sae included), so early
  latents learn coarse features.

Every loss here reads activations scaled to unit variance per dimension (the trainer folds the
scale back into the SAE), so `bandwidth` and the thresholds do not depend on the data's scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .dictionary import SparseAutoencoder

TRAINABLE = ("topk", "batchtopk", "jumprelu")


def normalised_mse(x: Tensor, recon: Tensor) -> Tensor:
    """Squared error over the batch's variance (1: no better than the batch mean)."""
    return (x - recon).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)


def aux_loss(sae: SparseAutoencoder, pre: Tensor, error: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """AuxK: the error reconstructed from the top `aux_k` dead latents, over the error's variance.
    Computed on the dead latents' columns only (a tenth of the latents dead: a tenth of the work)."""
    which = dead.nonzero().squeeze(-1)
    if len(which) == 0:
        return pre.new_zeros(())
    columns = pre[:, which]  # [batch, n_dead]
    top = columns.topk(min(aux_k, len(which)), dim=-1)
    acts = torch.zeros_like(columns).scatter(-1, top.indices, torch.relu(top.values))
    recon = acts @ sae.W_dec[which]
    return (recon - error).pow(2).sum(-1).mean() / error.pow(2).sum(-1).mean().clamp_min(1e-12)


def prefix_mse(sae: SparseAutoencoder, x: Tensor, acts: Tensor, prefixes: tuple[int, ...]) -> Tensor:
    """The mean over m in `prefixes` of the normalised MSE of acts[:, :m] @ W_dec[:m] + b_dec."""
    losses = [normalised_mse(x, acts[:, :m] @ sae.W_dec[:m] + sae.b_dec) for m in prefixes]
    return torch.stack(losses).mean()


def _rectangle(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """The rectangle kernel K((pre - threshold) / bandwidth) / bandwidth of the pseudo-derivatives."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _Step(torch.autograd.Function):
    """H(pre - threshold) with the paper's pseudo-derivative for the threshold (none for pre)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        kernel = _rectangle(pre, threshold, ctx.bandwidth)
        return None, (-kernel * grad).sum(0), None


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - threshold): the usual gradient for pre, the pseudo-derivative
    -threshold/bandwidth x rectangle((pre - threshold)/bandwidth) for the threshold."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        on = (pre > threshold).to(pre.dtype)
        kernel = _rectangle(pre, threshold, ctx.bandwidth)
        return grad * on, (-threshold * kernel * grad).sum(0), None


class Objective(nn.Module):
    """One architecture's training forward and loss; its parameters (if any) train with the SAE's."""

    def __init__(self, architecture: str, d_sae: int, k: int | None, aux_k: int, aux_coefficient: float,
                 l0_coefficient: float, bandwidth: float, prefixes: tuple[int, ...], threshold_init: float):
        super().__init__()
        self.architecture, self.k, self.aux_k, self.aux_coefficient = architecture, k, aux_k, aux_coefficient
        self.l0_coefficient, self.bandwidth, self.prefixes = l0_coefficient, bandwidth, prefixes
        if architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((d_sae,), float(torch.tensor(threshold_init).log())))
        self.register_buffer("running_threshold", torch.zeros(()))
        self.register_buffer("threshold_seen", torch.zeros((), dtype=torch.long))

    def inference_architecture(self) -> str:
        return "topk" if self.architecture == "topk" else "jumprelu"

    def activate(self, pre: Tensor) -> Tensor:
        """The training-time activation of pre-activations [batch, d_sae]."""
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        if self.architecture == "batchtopk":
            flat = torch.relu(pre).flatten()
            top = flat.topk(min(self.k * len(pre), flat.numel()), sorted=False)
            acts = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
            self._note_threshold(top.values)
            return acts
        return _JumpReLU.apply(pre, self.log_threshold.exp(), self.bandwidth)

    @torch.no_grad()
    def _note_threshold(self, kept: Tensor) -> None:
        positive = kept[kept > 0]
        if len(positive) and self.training:
            low = positive.min()
            seen = int(self.threshold_seen)
            self.running_threshold.copy_(low if seen == 0 else 0.99 * self.running_threshold + 0.01 * low)
            self.threshold_seen += 1

    def loss(self, sae: SparseAutoencoder, x: Tensor, pre: Tensor, acts: Tensor, dead: Tensor) -> Tensor:
        """The training loss of one batch x [batch, d_in] (scaled), its pre-activations and acts."""
        recon = sae.decode(acts)
        if self.prefixes:
            mse = prefix_mse(sae, x, acts, self.prefixes)
        else:
            mse = normalised_mse(x, recon)
        if self.architecture == "jumprelu":
            l0 = _Step.apply(pre, self.log_threshold.exp(), self.bandwidth).sum(-1).mean()
            return mse + self.l0_coefficient * l0
        return mse + self.aux_coefficient * aux_loss(sae, pre, (x - recon).detach(), dead, self.aux_k)

    def inference_threshold(self, d_sae: int) -> Tensor | None:
        """The threshold [d_sae] (on the scaled data) of the inference SAE; None for topk."""
        if self.architecture == "jumprelu":
            return self.log_threshold.detach().exp()
        if self.architecture == "batchtopk":
            return self.running_threshold.expand(d_sae).clone()
        return None


def settings_of(objective: Objective) -> dict[str, Any]:
    """The objective's settings, as a checkpoint records them."""
    return dict(architecture=objective.architecture, k=objective.k, aux_k=objective.aux_k,
                aux_coefficient=objective.aux_coefficient, l0_coefficient=objective.l0_coefficient,
                bandwidth=objective.bandwidth, prefixes=list(objective.prefixes))
