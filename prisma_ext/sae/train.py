"""Train a TopK SAE on stored activations: seeded, with dead-latent tracking and the AuxK loss,
resumable from a checkpoint.

    sae, log = train_topk(store, d_sae=1024, k=16, epochs=4, seed=0, checkpoint="run/")
    log["explained_variance"], log["dead_fraction"]

`data`: an `ActivationStore` or a tensor of activations [rows, d_in]. The method (Gao et al.
2024, "Scaling and evaluating sparse autoencoders"): decoder rows of unit norm (renormalised
after every step), the encoder initialised as the decoder's transpose, b_dec as the data mean;
loss = MSE of the reconstruction + `aux_coefficient` x AuxK, where AuxK reconstructs the
residual error from the `aux_k` largest pre-activations among the dead latents (those that have
not fired in the last `dead_after` rows), normalised by the error's variance. Rows are visited
in a seeded order within each shard (shard after shard, so reads stay sequential). With
`checkpoint` (a folder), the state (parameters, optimiser, step, the dead-latent counters, the
order's generator) is saved every `checkpoint_every` steps and a later call with the same
arguments resumes from it, ending where an uninterrupted run ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._files import replacing
from ..errors import InputError
from .dictionary import SparseAutoencoder

CHECKPOINT = "train_state.pt"


def _chunks(data: Any) -> list[Tensor]:
    from .store import ActivationStore

    if isinstance(data, ActivationStore):
        return [shard["acts"] for shard in data.shards()]
    if isinstance(data, Tensor) and data.ndim == 2 and data.is_floating_point():
        return [data.float()]
    raise InputError("train_topk: data must be an ActivationStore or activations [rows, d_in]")


def _batches(chunks: list[Tensor], batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    for chunk in chunks:
        order = torch.randperm(len(chunk), generator=gen)
        for start in range(0, len(chunk) - batch_size + 1, batch_size):  # whole batches: the same count each epoch
            yield chunk[order[start:start + batch_size]]


def _aux_loss(sae: SparseAutoencoder, pre: Tensor, error: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """AuxK: the error reconstructed from the top `aux_k` dead latents, over the error's variance."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    masked = torch.where(dead, pre, torch.full_like(pre, float("-inf")))
    top = masked.topk(min(aux_k, n_dead), dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    recon = acts @ sae.W_dec
    return (recon - error).pow(2).sum(-1).mean() / error.pow(2).sum(-1).mean().clamp_min(1e-12)


def train_topk(data: Any, d_sae: int, k: int, epochs: int = 1, batch_size: int = 1024, lr: float = 4e-4,
               seed: int = 0, aux_k: int | None = None, aux_coefficient: float = 1 / 32,
               dead_after: int | None = None, checkpoint: str | os.PathLike | None = None,
               checkpoint_every: int = 100, progress: bool = False) -> tuple[SparseAutoencoder, dict]:
    """A TopK SAE trained on `data` (see the module docstring). Returns (the SAE, a log with
    per-step `loss`, and at the end `explained_variance`, `l0`, `dead_fraction` over the data).
    `aux_k` defaults to d_in / 2 (at most d_sae); `dead_after` to one epoch's rows."""
    from ..analysis.progress import Progress

    chunks = _chunks(data)
    d_in = chunks[0].shape[-1]
    rows = sum(len(c) for c in chunks)
    if rows < batch_size:
        raise InputError(f"train_topk: {rows} rows is fewer than one batch of {batch_size}")
    aux_k = min(d_sae, aux_k or max(1, d_in // 2))
    dead_after = dead_after or rows
    sae = SparseAutoencoder(d_in, d_sae, "topk", k)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        direction = torch.randn(d_sae, d_in, generator=gen)
        sae.W_dec.copy_(direction / direction.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(torch.cat(chunks).mean(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    state = {"step": 0, "losses": []}
    steps_per_epoch = sum(len(c) // batch_size for c in chunks)
    total = epochs * steps_per_epoch
    path = Path(checkpoint) / CHECKPOINT if checkpoint is not None else None
    settings = dict(d_sae=d_sae, k=k, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, aux_k=aux_k,
                    aux_coefficient=aux_coefficient, dead_after=dead_after, rows=rows, d_in=d_in)
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["settings"] != settings:
            raise InputError(f"train_topk: {path} is a run with other settings ({saved['settings']}); use another "
                             "checkpoint folder")
        sae.load_state_dict(saved["sae"])
        optimizer.load_state_dict(saved["optimizer"])
        since_fired, state = saved["since_fired"], {"step": saved["step"], "losses": saved["losses"]}
        gen.set_state(saved["generator"])
    with Progress(total - state["step"], progress, "training the SAE", unit="step") as bar:
        for epoch in range(state["step"] // steps_per_epoch, epochs):
            skip = state["step"] - epoch * steps_per_epoch  # steps of this epoch already done
            if skip == 0:
                epoch_state = gen.get_state()  # the epoch's order, so a resumed epoch draws it again
            else:
                epoch_state = saved["epoch_generator"]
                gen.set_state(epoch_state)
            for i, x in enumerate(_batches(chunks, batch_size, gen)):
                if i < skip:
                    continue
                pre = sae.encode_pre(x)
                acts = sae.activate(pre)
                recon = sae.decode(acts)
                error = x - recon
                mse = error.pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
                fired = (acts > 0).any(0)
                since_fired = torch.where(fired, 0, since_fired + len(x))
                dead = since_fired >= dead_after
                loss = mse + aux_coefficient * _aux_loss(sae, pre, error.detach(), dead, aux_k)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
                state["step"] += 1
                state["losses"].append(float(loss.detach()))
                bar.update(1)
                if path is not None and state["step"] % checkpoint_every == 0:
                    _save(path, sae, optimizer, since_fired, state, gen, epoch_state, settings)
    if path is not None:
        _save(path, sae, optimizer, since_fired, state, gen, gen.get_state(), settings)
    return sae, {"loss": state["losses"], **evaluate(sae, torch.cat(chunks))}


def _save(path: Path, sae, optimizer, since_fired, state, gen, epoch_state, settings) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        torch.save({"sae": sae.state_dict(), "optimizer": optimizer.state_dict(), "since_fired": since_fired,
                    "step": state["step"], "losses": state["losses"], "generator": gen.get_state(),
                    "epoch_generator": epoch_state, "settings": settings}, tmp)


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, x: Tensor, batch_size: int = 8192) -> dict[str, float]:
    """Explained variance (1 - residual variance / variance), mean L0 and the fraction of latents
    that never fire, over activations x [rows, d_in]."""
    residual, l0, fired = 0.0, 0.0, torch.zeros(sae.d_sae, dtype=torch.bool)
    for chunk in x.split(batch_size):
        acts = sae.encode(chunk)
        residual += float((chunk - sae.decode(acts)).pow(2).sum())
        l0 += float((acts > 0).sum())
        fired |= (acts > 0).any(0)
    variance = float((x - x.mean(0)).pow(2).sum())
    return {"explained_variance": 1 - residual / max(variance, 1e-12), "l0": l0 / len(x),
            "dead_fraction": float((~fired).float().mean())}
