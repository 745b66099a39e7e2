"""Attribution patching: the gradient (linear) approximation of an activation-patching sweep
from one clean forward, one corrupted forward and one backward pass.

For a site activation a, the patched metric is approximated by
m(base) + (a_source - a_base) . dm/da|base, summed over the site's feature axis (d_model, or
d_head per head for "z") and over the tokens of each position group. Values estimate the same
quantity `activation_patching` measures, with the same normalisation, so the two compare directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .metrics import call_metric
from .patching import _result
from .results import ResultSet
from .sweep import HEAD_SITES, make_plan, site_name


def attribution_patching(model, clean: Tensor, corrupted: Tensor, metric: Callable,
                         sites=("resid_pre", "attn_out", "mlp_out", "z"), positions="all", heads="all",
                         layers=None, direction: str = "denoising", normalize: bool = False) -> ResultSet:
    """Same arguments and result layout as `activation_patching`; see the module docstring."""
    plan = make_plan(model, clean, corrupted, sites, positions, heads, layers, direction)
    be, sites, layer_list, head_list, groups = plan.backend, plan.sites, plan.layers, plan.heads, plan.groups
    base_input, source_input = plan.base_input, plan.source_input
    names = [site_name(s, layer) for s in sites for layer in layer_list]
    n = clean.shape[0]
    examples = torch.arange(n)
    with torch.no_grad():
        source = be.run(source_input, read=names)
    base = be.run(base_input, read=names, grad_of=lambda out: call_metric(metric, out, examples).sum())
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
                attr = (delta * base.grads[name]).sum(-1).float().cpu()  # [B, T] or [B, T, H]
                if site in HEAD_SITES:
                    attr = torch.einsum("bth,gt->bhg", attr[:, :, head_list], group_mask)
                else:
                    attr = attr @ group_mask.T  # [B, G]
                per_layer.append(attr)
            values = torch.stack(per_layer, dim=1)
            results[site] = values + m_base.view((-1,) + (1,) * (values.ndim - 1))
    m_clean, m_corr = (m_source, m_base) if direction == "denoising" else (m_base, m_source)
    meta = dict(direction=direction, normalized=normalize, clean_metric=m_clean, corrupted_metric=m_corr,
                backend=be.kind, approximation="attribution patching")
    return ResultSet({site: _result(site, values, m_clean, m_corr, normalize, be, layer_list, head_list, groups,
                                    meta)
                      for site, values in results.items()})
