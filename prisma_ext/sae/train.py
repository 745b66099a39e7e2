"""Train an SAE on stored activations: TopK, BatchTopK or JumpReLU (Matryoshka prefixes for the
first two), seeded, with dead-latent tracking and the AuxK loss where the method has one,
resumable from a checkpoint.

    sae, log = train_sae(store, d_sae=1024, architecture="batchtopk", k=16, epochs=4, checkpoint="run/")
    log["explained_variance"], log["l0"], log["dead_fraction"]

`data`: an `ActivationStore` or a tensor of activations [rows, d_in]. The losses are in
`prisma_ext.sae.objectives`. Common to all: the activations are scaled to unit variance per
dimension while training (the scale is folded back into b_enc, b_dec and the threshold, so the
returned SAE reads the raw activations), decoder rows of unit norm (renormalised after every
step), the encoder initialised as the decoder's transpose, b_dec as the data mean, Adam. A
latent is dead when it has not fired in the last `dead_after` rows. Rows are visited in a seeded
order within each shard (shard after shard, so reads stay sequential). With `checkpoint` (a
folder), the state (parameters, optimiser, step, the dead-latent counters, the order's
generator) is saved every `checkpoint_every` steps and a later call with the same arguments
resumes from it, ending where an uninterrupted run ends. A BatchTopK run returns a JumpReLU SAE
(its inference form, as SAELens saves it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._files import replacing
from ..errors import InputError
from .dictionary import SparseAutoencoder
from .objectives import TRAINABLE, Objective, settings_of

CHECKPOINT = "train_state.pt"


def _chunks(data: Any) -> list[Tensor]:
    from .store import ActivationStore

    if isinstance(data, ActivationStore):
        return [shard["acts"] for shard in data.shards()]
    if isinstance(data, Tensor) and data.ndim == 2 and data.is_floating_point():
        return [data.float()]
    raise InputError("train_sae: data must be an ActivationStore or activations [rows, d_in]")


def _batches(chunks: list[Tensor], batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    for chunk in chunks:
        order = torch.randperm(len(chunk), generator=gen)
        for start in range(0, len(chunk) - batch_size + 1, batch_size):  # whole batches: the same count each epoch
            yield chunk[order[start:start + batch_size]]


def train_sae(data: Any, d_sae: int, architecture: str = "topk", k: int | None = None, epochs: int = 1,
              batch_size: int = 1024, lr: float = 4e-4, seed: int = 0, aux_k: int | None = None,
              aux_coefficient: float = 1 / 32, l0_coefficient: float = 1e-3, bandwidth: float = 0.05,
              threshold_init: float = 0.1, prefixes: Sequence[int] | None = None, dead_after: int | None = None,
              checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 100,
              progress: bool = False) -> tuple[SparseAutoencoder, dict]:
    """An SAE of `architecture` ("topk", "batchtopk" or "jumprelu") trained on `data` (see the
    module docstring). Returns (the SAE, a log with per-step `loss`, and at the end
    `explained_variance`, `l0`, `dead_fraction` over the data). `k`: latents per row (topk) or
    on average (batchtopk); `aux_k` defaults to d_in / 2 (at most d_sae); `dead_after` to one
    epoch's rows; `l0_coefficient`, `bandwidth` and `threshold_init` (JumpReLU) are on the
    unit-variance scale; `prefixes`: Matryoshka prefix sizes (d_sae is added)."""
    from ..analysis.progress import Progress

    chunks = _chunks(data)
    d_in = chunks[0].shape[-1]
    rows = sum(len(c) for c in chunks)
    _check_settings(architecture, d_sae, k, rows, batch_size, prefixes)
    aux_k = min(d_sae, aux_k or max(1, d_in // 2))
    dead_after = dead_after or rows
    mean = torch.cat(chunks).mean(0)
    scale = float(torch.cat(chunks).sub(mean).pow(2).mean().sqrt().clamp_min(1e-12))
    chunks = [c / scale for c in chunks]
    prefixes = tuple(sorted({*(prefixes or ()), d_sae})) if prefixes else ()
    objective = Objective(architecture, d_sae, k, aux_k, aux_coefficient, l0_coefficient, bandwidth, prefixes,
                          threshold_init)
    sae = SparseAutoencoder(d_in, d_sae, "topk" if architecture == "topk" else "standard", k)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        direction = torch.randn(d_sae, d_in, generator=gen)
        sae.W_dec.copy_(direction / direction.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(mean / scale)
    optimizer = torch.optim.Adam([*sae.parameters(), *objective.parameters()], lr=lr)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    state = {"step": 0, "losses": []}
    steps_per_epoch = sum(len(c) // batch_size for c in chunks)
    total = epochs * steps_per_epoch
    path = Path(checkpoint) / CHECKPOINT if checkpoint is not None else None
    settings = dict(d_sae=d_sae, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, dead_after=dead_after,
                    threshold_init=threshold_init, rows=rows, d_in=d_in, **settings_of(objective))
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["settings"] != settings:
            raise InputError(f"train_sae: {path} is a run with other settings ({saved['settings']}); use another "
                             "checkpoint folder")
        sae.load_state_dict(saved["sae"])
        objective.load_state_dict(saved["objective"])
        optimizer.load_state_dict(saved["optimizer"])
        since_fired, state = saved["since_fired"], {"step": saved["step"], "losses": saved["losses"]}
        gen.set_state(saved["generator"])
    with Progress(total - state["step"], progress, f"training the {architecture} SAE", unit="step") as bar:
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
                acts = objective.activate(pre)
                since_fired = torch.where((acts > 0).any(0), 0, since_fired + len(x))
                loss = objective.loss(sae, x, pre, acts, since_fired >= dead_after)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
                state["step"] += 1
                state["losses"].append(float(loss.detach()))
                bar.update(1)
                if path is not None and state["step"] % checkpoint_every == 0:
                    _save(path, sae, objective, optimizer, since_fired, state, gen, epoch_state, settings)
    if path is not None:
        _save(path, sae, objective, optimizer, since_fired, state, gen, gen.get_state(), settings)
    trained = _inference_sae(sae, objective, scale)
    return trained, {"loss": state["losses"], "scale": scale, **evaluate(trained, torch.cat(chunks) * scale)}


def train_topk(data: Any, d_sae: int, k: int, **options: Any) -> tuple[SparseAutoencoder, dict]:
    """`train_sae(data, d_sae, "topk", k, ...)`."""
    return train_sae(data, d_sae, "topk", k, **options)


def _check_settings(architecture: str, d_sae: int, k: int | None, rows: int, batch_size: int,
                    prefixes: Sequence[int] | None) -> None:
    if architecture not in TRAINABLE:
        raise InputError(f"train_sae: architecture {architecture!r} cannot be trained here; trainable: "
                         f"{', '.join(TRAINABLE)}")
    if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1:
        raise InputError(f"train_sae: d_sae must be a positive int, got {d_sae!r}")
    if architecture != "jumprelu" and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae):
        raise InputError(f"train_sae: a {architecture} SAE needs k, an int in [1, d_sae={d_sae}], got {k!r}")
    if architecture == "jumprelu" and k is not None:
        raise InputError("train_sae: a jumprelu SAE takes no k (its sparsity comes from l0_coefficient)")
    if prefixes:
        if architecture == "jumprelu":
            raise InputError("train_sae: Matryoshka prefixes are for topk and batchtopk SAEs")
        if any(isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= d_sae for m in prefixes):
            raise InputError(f"train_sae: prefixes must be ints in [1, d_sae={d_sae}], got {list(prefixes)}")
    if rows < batch_size:
        raise InputError(f"train_sae: {rows} rows is fewer than one batch of {batch_size}")


@torch.no_grad()
def _inference_sae(sae: SparseAutoencoder, objective: Objective, scale: float) -> SparseAutoencoder:
    """The trained SAE on the raw (unscaled) activations, in its inference architecture."""
    out = SparseAutoencoder(sae.d_in, sae.d_sae, objective.inference_architecture(), sae.k)
    out.W_enc.copy_(sae.W_enc)
    out.W_dec.copy_(sae.W_dec)
    out.b_enc.copy_(sae.b_enc * scale)
    out.b_dec.copy_(sae.b_dec * scale)
    threshold = objective.inference_threshold(sae.d_sae)
    if threshold is not None:
        out.threshold.copy_(threshold * scale)
    return out


def _save(path: Path, sae, objective, optimizer, since_fired, state, gen, epoch_state, settings) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        torch.save({"sae": sae.state_dict(), "objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                    "since_fired": since_fired,
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
