"""A latent dashboard: one self-contained HTML page (plotly inlined, images as PNG, offline).

    path = sae_dashboard(model, sae, site, images, "latents.html", latents=[17, 42], names={17: "red"})

An overview (the SAE on these images: explained variance, L0, dead latents, how often latents
fire) and, per latent, its top images with the activating patches as a heatmap over each (one
scale for the latent), the histogram of its non-zero activations, its direct effect on the
classes (or CLIP prompts, through the zero-shot head), and what ablating it at every token does
to the class logits on its top images (`prisma_ext.sae.explain`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from .dictionary import SparseAutoencoder
from .explain import _site_values, direct_effect, firing_summary, latent_ablation, latent_activations, top_images


def _scan(backend: Any, sae: SparseAutoencoder, site: str, images: Tensor, batch_size: int) -> dict[str, Any]:
    """One pass over the images: every latent's largest activation per image [N, d_sae], how
    many tokens it fires on [d_sae], and the SAE's reconstruction quality at the site (over all
    the site's rows at once: explained variance is not an average of per-chunk ones)."""
    from .train import evaluate

    peaks, fired, flats = [], torch.zeros(sae.d_sae), []
    with torch.no_grad():
        for acts in _site_values(backend, site, images, batch_size):
            acts = acts.float()
            z = sae.encode(acts)
            peaks.append(z.amax(1).cpu())
            fired += (z > 0).sum((0, 1)).cpu()
            flats.append(acts.reshape(-1, acts.shape[-1]).cpu())
        flat = torch.cat(flats)
        quality = evaluate(sae, flat)
    return {"peaks": torch.cat(peaks), "frequency": fired / len(flat),
            "explained_variance": quality["explained_variance"], "l0": quality["l0"]}


def pick_latents(peaks: Tensor, n: int) -> list[int]:
    """`n` latents worth a look: among those that fire on between 1% and 50% of the images (not
    dead, not dense), the ones with the largest mean peak activation where they fire."""
    on = peaks > 0
    share = on.float().mean(0)
    strength = (peaks * on).sum(0) / on.sum(0).clamp_min(1)
    eligible = (share >= 0.01) & (share <= 0.5)
    if not eligible.any():
        eligible = share > 0
    order = torch.where(eligible, strength, torch.full_like(strength, -1.0)).argsort(descending=True)
    return [int(i) for i in order[: min(n, int(eligible.sum()))]]


def _pixels(images: Tensor, cfg: Any) -> list[np.ndarray]:
    from ..report.inputs import to_pixels

    return [to_pixels(images[i:i + 1], cfg) for i in range(len(images))]


def _bar(values: Tensor, labels: list[str], title: str, axis: str, n: int = 10):
    import plotly.graph_objects as go

    order = values.abs().argsort(descending=True)[:n].tolist()
    order.sort(key=lambda i: float(values[i]))
    fig = go.Figure(go.Bar(x=[float(values[i]) for i in order], y=[labels[i] for i in order], orientation="h",
                           marker_color=["#c0392b" if values[i] < 0 else "#2a6fb0" for i in order]))
    fig.update_layout(title=title, xaxis_title=axis, yaxis_title="class", height=120 + 24 * len(order), width=520,
                      margin=dict(l=10, r=10, t=70, b=40))
    return fig


def _histogram(values: Tensor, title: str, axis: str, log_y: bool = False):
    import plotly.graph_objects as go

    fig = go.Figure(go.Histogram(x=values.numpy(), nbinsx=40, marker_color="#2a6fb0"))
    fig.update_layout(title=title, xaxis_title=axis, yaxis_title="count", height=300, width=520,
                      yaxis_type="log" if log_y else None, margin=dict(l=10, r=10, t=70, b=40))
    return fig


def _check_inputs(sae: Any, images: Any, n_latents: Any, n_top: Any) -> None:
    if not isinstance(sae, SparseAutoencoder):
        raise InputError(f"sae_dashboard: expected a SparseAutoencoder, got {type(sae).__name__}")
    if not isinstance(images, Tensor) or images.ndim != 4 or len(images) < 2:
        raise InputError("sae_dashboard: images must be a batch [N >= 2, 3, H, W] of model inputs")
    for name, value in (("n_latents", n_latents), ("n_top", n_top)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"sae_dashboard: {name} must be a positive int, got {value!r}")


def build_dashboard(model: Any, sae: SparseAutoencoder, site: str, images: Tensor, latents: Any = None,
                    names: dict[int, str] | None = None, n_latents: int = 6, n_top: int = 6, title: str | None = None,
                    batch_size: int = 32, log: Any = None) -> Any:
    """The dashboard as a `prisma_ext.report.page.Page` (see `sae_dashboard`)."""
    from ..analysis.backend import Backend
    from ..analysis.common import patches_of
    from ..report.page import Page
    from ..viz.overlay import overlay_figure
    from .explain import _latents

    _check_inputs(sae, images, n_latents, n_top)
    names = dict(names or {})
    log = log or (lambda message: None)
    backend = Backend.of(model)
    start = time.perf_counter()
    scan = _scan(backend, sae, site, images, batch_size)
    chosen = _latents(sae, latents) if latents is not None else pick_latents(scan["peaks"], n_latents)
    log(f"scanned {len(images)} images for {sae.d_sae} latents ({time.perf_counter() - start:.1f} s)")
    classes = backend.class_names or [str(i) for i in range(backend.output(images[:1]).shape[-1])]
    page = Page(title or f"SAE latents at {site}")
    dead = float((scan["peaks"].amax(0) <= 0).float().mean())
    page.intro(f"{sae.d_sae} latents ({sae.architecture}) at {site}, over {len(images)} images: explained variance "
               f"{scan['explained_variance']:.3f}, mean L0 {scan['l0']:.1f}, {dead:.1%} of latents never fire here.")
    page.section("overview", "Overview")
    frequency = scan["frequency"]
    page.figure(_histogram(torch.log10(frequency[frequency > 0]), "How often each latent fires (latents that fire)",
                           "log10 share of tokens it fires on"))
    cfg, layout = backend.cfg, backend.layout
    pixels = _pixels(images, cfg)
    acts = latent_activations(model, sae, site, images, chosen, batch_size)
    summary = firing_summary(acts)
    rows = []
    for j, latent in enumerate(chosen):
        label = names.get(latent, "")
        heading = f"latent {latent}" + (f" ({label})" if label else "")
        column = acts.values[..., j]
        order, peak = top_images(acts, latent, n_top)
        rows.append([latent, label, float(summary["frequency"][j]), float(summary["image_frequency"][j]),
                     float(summary["mean_active"][j])])
        page.section(f"latent-{latent}", heading)
        if not len(order):
            page.note("It does not fire on any of these images.", "skipped")
            continue
        grid = patches_of(column[order], layout).reshape(len(order), *layout.grid)
        prefix = ", CLS {:.3g}" if layout.n_cls else ""
        maps = {f"image {int(i)}: peak {float(p):.3g}" + prefix.format(float(column[i, 0])): grid[j].numpy()
                for j, (i, p) in enumerate(zip(order, peak))}
        shown = {key: pixels[int(i)] for key, i in zip(maps, order)}
        page.figure(overlay_figure(shown, maps, cfg.patch_size, f"{heading}: its top images (patches)",
                                   cols=3, shared="activation"))
        page.figure(_histogram(column[column > 0], f"{heading}: its non-zero activations (all tokens)", "activation",
                               log_y=True))
        effect = direct_effect(model, sae, latent, images[: min(len(images), 64)], batch_size)
        page.figure(_bar(effect.values, classes, f"{heading}: direct effect on the class logits",
                         "logit per unit of activation (final norm's scale frozen)"))
        change = latent_ablation(model, sae, site, latent, images[order], batch_size=batch_size).values.mean(0)
        page.figure(_bar(change, classes, f"{heading}: ablating it on its top images",
                         "mean change of the logit (ablated - clean)"))
    page.section("summary", "Latents shown")
    page.table([[r[0], r[1], round(r[2], 4), round(r[3], 3), round(r[4], 3)] for r in rows],
               ["latent", "name", "share of tokens", "share of images", "mean when firing"])
    page.note("Direct effect: the latent's decoder direction written into the pooled token, read out through the final "
              "norm with its scale frozen (the mean over these images) and the head, skipping later layers. Ablation: "
              "the latent set to 0 at every token with the SAE's error term kept, so only this latent changes.")
    log(f"built {len(chosen)} latent sections ({time.perf_counter() - start:.1f} s)")
    return page


def sae_dashboard(model: Any, sae: SparseAutoencoder, site: str, images: Tensor, out: str | os.PathLike,
                  **options: Any) -> Path:
    """Write the dashboard (module docstring) to `out` (an .html file you name; written
    atomically, so an error leaves no partial file); returns its path. Options: `latents`
    (default: `pick_latents`), `names` {latent: label}, `n_latents`, `n_top`, `title`."""
    from .._files import replacing

    path = Path(out)
    if path.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"sae_dashboard: out must be an .html file, got {str(path)!r}")
    if not path.parent.is_dir():
        raise InputError(f"sae_dashboard: the folder {str(path.parent)!r} does not exist")
    page = build_dashboard(model, sae, site, images, **options)
    with replacing(path) as tmp:
        tmp.write_text(page.render(), encoding="utf-8")
    return path
