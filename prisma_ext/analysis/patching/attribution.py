"""Attribution patching: the gradient (linear) approximation of an activation-patching sweep
from one clean forward, one corrupted forward and one backward pass.

For a site activation a, the patched metric is approximated by
m(base) + (a_source - a_base) . dm/da|base, summed over the site's feature axis (d_model, or
d_head per head for "z") and over the tokens of each position group. Values estimate the same
quantity `activation_patching` measures, with the same normalisation, so the two compare directly.

Where patches are large (a token's residual replaced by a nearly orthogonal one, say) the
first-order estimate can be poor. `steps=k` averages dm/da over k inputs evenly spaced on the
line from the base to the source input instead of taking it at the base alone (the input
interpolation of EAP-IG, Hanna et al. 2024): k forward and backward passes, and in our
measurements much closer to exact patching (docs/patching.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...errors import InputError
from ..backend import Backend, Run
from ..common import naming
from ..progress import Progress
from ..result import ResultSet
from ..targets import Target, bind
from .activation import DEFAULT_SITES
from .plan import HEAD_SITES, Plan, make_plan, site_name
from .runner import output_acts, score_rows
from .target_arg import METRIC_UNSET, patching_target


@naming("attribution_patching")
def attribution_patching(model, clean: Tensor, corrupted: Tensor, target: Any = None, *, sites=DEFAULT_SITES,
                         positions="all", heads="all", layers=None, direction: str = "denoising",
                         normalize: bool = False, steps: int = 1, batch_size: int | None = None,
                         progress: bool = True, metric: Any = METRIC_UNSET) -> ResultSet:
    """Same arguments and result layout as `activation_patching`; see the module docstring.
    `target`: what `activation_patching` takes; it must be differentiable in the output.
    `steps`: 1 takes the gradient at the base run (classic attribution patching); k > 1 averages
    it over k points from the base to the source input. `batch_size`: examples per forward and
    backward pass (default: the same activation budget as activation patching's chunks)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive int, got {steps!r}")
    target = patching_target(target, metric)
    plan = make_plan(model, clean, corrupted, sites, positions, heads, layers, direction, batch_size)
    be, names = plan.backend, plan.names()
    n = plan.n_examples
    examples = torch.arange(n)
    with torch.no_grad():
        source = _run_chunked(be, plan.source_input, names, plan.chunk_size())
        clean_output = source.output if direction == "denoising" else None
        bound = bind(be, clean, target, clean_output, what="target, the patching metric")
        served = output_acts(be, bound)
    base, grads = _base_and_grads(plan, bound, served, steps, progress)
    with torch.no_grad():
        m_base = score_rows(bound, base.output.detach(), examples, served).float().cpu()
        m_source = score_rows(bound, source.output, examples, served).float().cpu()
        group_mask = plan.groups.mask(next(iter(base.acts.values())).shape[1]).float()  # [G, T]
        results = {}
        for site in plan.sites:
            per_layer = []
            for layer in plan.layers:
                name = site_name(site, layer)
                delta = source.acts[name].detach() - base.acts[name].detach()
                attr = (delta * grads[name]).sum(-1).float().cpu()  # [B, T] or [B, T, H]
                if site in HEAD_SITES:
                    attr = torch.einsum("bth,gt->bhg", attr[:, :, plan.heads], group_mask)
                else:
                    attr = attr @ group_mask.T  # [B, G]
                per_layer.append(attr)
            values = torch.stack(per_layer, dim=1)
            results[site] = values + m_base.view((-1,) + (1,) * (values.ndim - 1))
    m_clean, m_corr = plan.clean_and_corrupted(m_base, m_source)
    meta = dict(direction=direction, normalized=normalize, clean_metric=m_clean, corrupted_metric=m_corr,
                backend=be.kind, approximation="attribution patching", steps=steps, target=bound.describe())
    return plan.results(results, m_clean, m_corr, normalize, meta)


def _run_chunked(be: Backend, images: Tensor, names: list[str], size: int, grad_of=None) -> Run:
    """One run over `images` in chunks of `size` rows, its outputs, site values and gradients
    concatenated (gradients of a sum over rows are per-row, so chunks do not interact)."""
    runs = []
    for start in range(0, images.shape[0], size):
        rows = torch.arange(start, min(start + size, images.shape[0]))
        runs.append(be.run(images[rows], read=names, grad_of=grad_of(rows) if grad_of else None))
    if len(runs) == 1:
        return runs[0]
    return Run(torch.cat([r.output for r in runs]), {k: torch.cat([r.acts[k] for r in runs]) for k in runs[0].acts},
               {k: torch.cat([r.grads[k] for r in runs]) for k in runs[0].grads})


def _base_and_grads(plan: Plan, target: Target, served, steps: int, progress: bool
                    ) -> tuple[Run, dict[str, Tensor]]:
    """The base run (output and site values) and d target / d site: at the base input when
    steps == 1, else the mean over the midpoints of `steps` equal pieces of the base-to-source line."""
    be, names, size = plan.backend, plan.names(), plan.chunk_size()

    def total(rows: Tensor):
        return lambda out: score_rows(target, out, rows, served).sum()

    with Progress(steps, progress and steps > 1, "attribution patching", unit="step") as bar:
        if steps == 1:
            base = _run_chunked(be, plan.base_input, names, size, grad_of=total)
            return base, base.grads
        with torch.no_grad():
            base = _run_chunked(be, plan.base_input, names, size)
        grads: dict[str, Tensor] = {}
        for k in range(steps):
            point = torch.lerp(plan.base_input, plan.source_input, (k + 0.5) / steps)
            for name, g in _run_chunked(be, point, names, size, grad_of=total).grads.items():
                grads[name] = grads.get(name, 0) + g / steps
            bar.update(1)
    return base, grads
