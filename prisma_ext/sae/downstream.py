"""What an SAE costs the model when it replaces its site: agreement, accuracy and KL recovered.

    scores = downstream(model, sae, "blocks.2.hook_resid_post", images, labels=labels)
    scores["kl_recovered"], scores["accuracy_spliced"], scores["agreement"]

On a classifier of either backend (a HookedViT, a CLIP tower with its zero-shot head, or a
TracedViT: the runs go through `prisma_ext.analysis.backend.Backend`, so both give the same
numbers), over `images`: the clean run, the run with the site replaced by the SAE's
reconstruction (no error term), and a baseline run with the site replaced by its mean over the
images and tokens (mean ablation). The site is one of the model's site names (for a CLIP, pass
its vision tower, `clip.visual`, whose names are unprefixed).
- `kl_spliced`, `kl_ablated`: mean KL(clean || run) of the output distributions;
- `kl_recovered` = 1 - kl_spliced / kl_ablated (1: as good as the real activations; 0: no better
  than the mean; SAELens's score is the same shape, on the loss);
- `agreement`: the share of images whose top class is the clean run's;
- with `labels`: `accuracy_clean`, `accuracy_spliced` and `accuracy_recovered` =
  (spliced - ablated) / (clean - ablated).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, UnknownNameError, suggest
from .dictionary import SparseAutoencoder


def _kl(clean: Tensor, other: Tensor) -> float:
    p = clean.log_softmax(-1)
    return float((p.exp() * (p - other.log_softmax(-1))).sum(-1).mean())


def downstream(model: Any, sae: SparseAutoencoder, site: str, images: Tensor, labels: Tensor | None = None,
               batch_size: int = 32) -> dict[str, float]:
    """The SAE spliced at `site` against the clean model and a mean ablation (module docstring)."""
    from ..analysis.backend import Backend
    from .splice import splice

    if not isinstance(images, Tensor) or images.ndim != 4 or len(images) < 1:
        raise InputError("downstream: images must be a batch [N, 3, H, W]")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != (len(images),)):
        raise InputError(f"downstream: labels must be a tensor [{len(images)}] of class indices")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"downstream: batch_size must be a positive int, got {batch_size!r}")
    backend = Backend.of(model)
    target = backend.vit if backend.kind == "tl" else model  # what Backend.run runs (a CLIP's vision tower)
    if site not in backend.site_names:
        raise UnknownNameError(f"downstream: {suggest(str(site), backend.site_names, 'site')}")
    chunks = images.split(batch_size)
    with torch.no_grad():
        clean, total, count = [], 0.0, 0
        for x in chunks:
            run = backend.run(x, read=[site])
            clean.append(run.output.float())
            flat = run.acts[site].float().flatten(0, -2)  # every image and token: [rows, d]
            total, count = total + flat.sum(0), count + len(flat)
        mean = total / count

        def ablate(value: Tensor) -> Tensor:
            return mean.to(value).expand_as(value)

        ablated = torch.cat([backend.run(x, edit={site: ablate}).output for x in chunks]).float()
        spliced_at = backend.model_site(site) if backend.kind == "nnsight" else site  # a traced CLIP's `visual.` name
        with splice(target, sae, spliced_at, use_error_term=False):
            spliced = torch.cat([backend.run(x).output for x in chunks]).float()
    clean = torch.cat(clean)
    kl_spliced, kl_ablated = _kl(clean, spliced), _kl(clean, ablated)
    top = clean.argmax(-1)
    scores = {"kl_spliced": kl_spliced, "kl_ablated": kl_ablated,
              "kl_recovered": 1 - kl_spliced / kl_ablated if kl_ablated > 0 else float("nan"),
              "agreement": float((spliced.argmax(-1) == top).float().mean())}
    if labels is not None:
        acc = {name: float((out.argmax(-1) == labels).float().mean())
               for name, out in (("clean", clean), ("spliced", spliced), ("ablated", ablated))}
        gap = acc["clean"] - acc["ablated"]
        scores |= {"accuracy_clean": acc["clean"], "accuracy_spliced": acc["spliced"],
                   "accuracy_ablated": acc["ablated"],
                   "accuracy_recovered": (acc["spliced"] - acc["ablated"]) / gap if gap else float("nan")}
    return scores
