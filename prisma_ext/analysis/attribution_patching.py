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

from ..errors import InputError
from .backend import Run
from .metrics import as_metric, call_metric
from .patching import _result
from .results import ResultSet
from .sweep import HEAD_SITES, make_plan, site_name


def attribution_patching(model, clean: Tensor, corrupted: Tensor, metric: Any,
                         sites=("resid_pre", "attn_out", "mlp_out", "z"), positions="all", heads="all",
                         layers=None, direction: str = "denoising", normalize: bool = False,
                         steps: int = 1) -> ResultSet:
    """Same arguments and result layout as `activation_patching`; see the module docstring.
    `metric`: a function metric(output, examples) -> [n] or a target (`as_metric`); it must be
    differentiable in the output. `steps`: 1 takes the gradient at the base run (classic
    attribution patching); k > 1 averages it over k points from the base to the source input."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive int, got {steps!r}")
    plan = make_plan(model, clean, corrupted, sites, positions, heads, layers, direction)
    be, sites, layer_list, head_list, groups = plan.backend, plan.sites, plan.layers, plan.heads, plan.groups
    base_input, source_input = plan.base_input, plan.source_input
    names = [site_name(s, layer) for s in sites for layer in layer_list]
    n = clean.shape[0]
    examples = torch.arange(n)
    with torch.no_grad():
        source = be.run(source_input, read=names)
        metric = as_metric(be, clean, metric, source.output if direction == "denoising" else None)
    base, grads = _base_and_grads(be, base_input, source_input, names, metric, examples, steps)
    with torch.no_grad():
        m_base = call_metric(metric, base.output.detach(), examples).float().cpu()
        m_source = call_metric(metric, source.output, examples).float().cpu()
        group_mask = groups.mask(next(iter(base.acts.values())).shape[1]).float()  # [G, T]
        results = {}
        for site in sites:
            per_layer = []
            for layer in layer_list:
                name = site_name(site, layer)
                delta = source.acts[name].detach() - base.acts[name].detach()
                attr = (delta * grads[name]).sum(-1).float().cpu()  # [B, T] or [B, T, H]
                if site in HEAD_SITES:
                    attr = torch.einsum("bth,gt->bhg", attr[:, :, head_list], group_mask)
                else:
                    attr = attr @ group_mask.T  # [B, G]
                per_layer.append(attr)
            values = torch.stack(per_layer, dim=1)
            results[site] = values + m_base.view((-1,) + (1,) * (values.ndim - 1))
    m_clean, m_corr = (m_source, m_base) if direction == "denoising" else (m_base, m_source)
    meta = dict(direction=direction, normalized=normalize, clean_metric=m_clean, corrupted_metric=m_corr,
                backend=be.kind, approximation="attribution patching", steps=steps)
    return ResultSet({site: _result(site, values, m_clean, m_corr, normalize, be, layer_list, head_list, groups,
                                    meta)
                      for site, values in results.items()})


def _base_and_grads(be, base_input: Tensor, source_input: Tensor, names: list[str], metric, examples: Tensor,
                    steps: int) -> tuple[Run, dict[str, Tensor]]:
    """The base run (output and site values) and d metric / d site: at the base input when
    steps == 1, else the mean over the midpoints of `steps` equal pieces of the base-to-source line."""
    def total(out: Tensor) -> Tensor:
        return call_metric(metric, out, examples).sum()

    if steps == 1:
        base = be.run(base_input, read=names, grad_of=total)
        return base, base.grads
    with torch.no_grad():
        base = be.run(base_input, read=names)
    grads: dict[str, Tensor] = {}
    for k in range(steps):
        point = be.run(torch.lerp(base_input, source_input, (k + 0.5) / steps), read=names, grad_of=total)
        for name, g in point.grads.items():
            grads[name] = grads.get(name, 0) + g / steps
    return base, grads
