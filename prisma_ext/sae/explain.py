"""What one SAE latent means: where it fires, what it writes, what removing it changes.

    acts = latent_activations(model, sae, site, images)         # AnalysisResult [batch, token, latent]
    top = top_images(acts, latent=7, n=9)                        # the images it fires most on
    acts.grid()                                                  # [batch, latent, gh, gw]: heatmaps
    effect = direct_effect(model, sae, latent=7, images=images)  # AnalysisResult [class]
    change = latent_ablation(model, sae, site, latent=7, images=images)

Either backend (`prisma_ext.analysis.backend.Backend`). `model` is a classifier (HookedViT,
TracedViT) or a CLIP whose vision tower has a zero-shot head (`use_zero_shot_head`): class
logits are what the direct effect and the ablation read. The site is a residual-stream site of
the vision tower (`blocks.{i}.hook_resid_*`, unprefixed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..analysis.common import check_batch
from ..analysis.result import AnalysisResult
from ..errors import InputError, PrismaError
from .dictionary import SparseAutoencoder


def _latents(sae: SparseAutoencoder, latents: Any) -> list[int]:
    ids = list(range(sae.d_sae)) if latents is None else [latents] if isinstance(latents, int) else list(latents)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < sae.d_sae]
    if bad or not ids:
        raise InputError(f"latents must be ints in [0, d_sae={sae.d_sae}), got {bad or latents!r}")
    return ids


def _site_values(backend: Any, site: str, images: Tensor, batch_size: int) -> Any:
    """The site's activations [batch, token, d] in chunks of `batch_size` images."""
    for x in images.split(batch_size):
        yield backend.run(x, read=[site]).acts[site]


@torch.no_grad()
def latent_activations(model: Any, sae: SparseAutoencoder, site: str, images: Tensor, latents: Any = None,
                       batch_size: int = 32) -> AnalysisResult:
    """The SAE's latents at `site` over `images`: values [batch, token, latent] for `latents`
    (an int, a list, or None for all), as an AnalysisResult (`grid()`: the patch heatmaps)."""
    from ..analysis.backend import Backend

    check_batch(images, "latent_activations")
    ids = _latents(sae, latents)
    backend = Backend.of(model)
    index = torch.tensor(ids)
    values = []
    for acts in _site_values(backend, site, images, batch_size):
        if acts.ndim != 3 or acts.shape[-1] != sae.d_in:
            raise InputError(f"latent_activations: {site} is {tuple(acts.shape)}; the SAE reads [batch, token, "
                             f"{sae.d_in}]")
        values.append(sae.encode(acts.float())[..., index].cpu())
    return AnalysisResult("sae_latents", torch.cat(values), ("batch", "token", "latent"), backend.layout,
                          coords={"latent": ids}, meta={"site": site, "d_sae": sae.d_sae})


def top_images(acts: AnalysisResult, latent: int, n: int = 9) -> tuple[Tensor, Tensor]:
    """(image indices [<= n], their largest activation of `latent` over tokens), largest first;
    images where the latent never fires are left out."""
    ids = acts.coords["latent"]
    if latent not in ids:
        raise InputError(f"top_images: latent {latent} was not computed (computed: {ids[:8]}...)")
    peak = acts.values[..., ids.index(latent)].amax(1)
    order = peak.argsort(descending=True)[:n]
    order = order[peak[order] > 0]
    return order, peak[order]


def firing_summary(acts: AnalysisResult) -> dict[str, Tensor]:
    """Per latent: `frequency` (share of tokens where it fires), `image_frequency` (share of
    images where it fires on some token), `mean_active` (its mean where it fires) [latent]."""
    values = acts.values
    on = values > 0
    count = on.sum((0, 1))
    return {"frequency": on.float().mean((0, 1)), "image_frequency": on.any(1).float().mean(0),
            "mean_active": values.sum((0, 1)) / count.clamp_min(1)}


@torch.no_grad()
def direct_effect(model: Any, sae: SparseAutoencoder, latent: int, images: Tensor | None = None,
                  batch_size: int = 32) -> AnalysisResult:
    """The class logits a unit of `latent` adds when written straight into the pooled token,
    through the final norm with its scale frozen (the direct-effect convention, as in direct
    logit attribution), skipping every later layer: values [class] = centred(W_dec[latent]) /
    scale . (the final norm's weight x W_U). `scale`: the final norm's mean scale on the pooled
    token over `images` (without images: 1, i.e. per unit of the normalised stream)."""
    from ..analysis.backend import Backend

    backend = Backend.of(model)
    readout = backend.readout
    readout.require_linear("direct_effect")
    if backend.cfg.n_dist:
        raise PrismaError("direct_effect: a distilled model reads two tokens with two heads; not supported")
    latent = _latents(sae, latent)[0]
    direction = sae.W_dec[latent].float()
    cfg = backend.cfg
    if cfg.final_norm != "none" and cfg.norm_type != "rmsnorm":
        direction = direction - direction.mean()
    scale = 1.0
    if images is not None:
        check_batch(images, "direct_effect")
        final = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
        scales = [readout.final_scale(acts.float()) for acts in _site_values(backend, final, images, batch_size)]
        weights = readout.token_weights(backend.layout.n_tokens)
        scale = float((torch.cat(scales)[..., 0] * weights).sum(-1).mean())
    n_classes = readout.unembed()[0].shape[-1]
    W = readout.pooled_directions(torch.arange(n_classes)).float()  # [class, d_model]
    values = (W @ direction.to(W.device)).cpu() / scale
    return AnalysisResult("sae_direct_effect", values, ("class",), backend.layout, class_names=backend.class_names,
                          meta={"latent": latent, "scale": scale})


@torch.no_grad()
def latent_ablation(model: Any, sae: SparseAutoencoder, site: str, latent: int, images: Tensor,
                    value: float = 0.0, batch_size: int = 32) -> AnalysisResult:
    """What setting `latent` to `value` (0: ablation; e.g. its largest activation: steering)
    at every token does to the output, the rest of the site kept exactly (the SAE's error term
    stays): values [batch, class] = edited logits - clean logits. The site's value moves by
    decode(edited latents) - decode(latents), the same as splicing the SAE with its error term
    and editing `hook_sae_acts_post`."""
    from ..analysis.backend import Backend

    check_batch(images, "latent_ablation")
    latent = _latents(sae, latent)[0]
    backend = Backend.of(model)

    def edit(acts: Tensor) -> Tensor:
        z = sae.encode(acts.float())
        recon = sae.decode(z)
        z[..., latent] = value
        return (acts.float() + sae.decode(z) - recon).to(acts.dtype)

    changes = []
    for x in images.split(batch_size):
        clean = backend.output(x).float()
        changes.append((backend.run(x, edit={site: edit}).output.float() - clean).cpu())
    return AnalysisResult("sae_latent_ablation", torch.cat(changes), ("batch", "class"), backend.layout,
                          class_names=backend.class_names, meta={"site": site, "latent": latent, "value": value})
