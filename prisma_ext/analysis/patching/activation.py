"""Activation patching, batched: many patched runs per forward pass, and on the TL backend the
base run's activations below the patched layer are reused instead of recomputed.

Denoising (the default) patches the clean run's activation into the corrupted run; noising
patches the corrupted activation into the clean run. Either way `normalize=True` rescales the
target so that 0 is the corrupted run's value and 1 the clean run's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...errors import PrismaError, check_identity
from ..common import naming
from ..progress import Progress
from ..result import ResultSet
from ..targets import bind
from .plan import HEAD_SITES, Jobs, make_jobs, make_plan, site_name
from .positions import PositionGroups
from .runner import PatchRunner, output_acts, score_rows
from .target_arg import METRIC_UNSET, patching_target

DEFAULT_SITES = ("resid_pre", "attn_out", "mlp_out", "z")


def check_everything_patched(runner: PatchRunner, plan, target, served, m_source: Tensor) -> None:
    """Patching's identity: the residual stream of every token patched gives the source run's
    score (one extra run per example through the same machinery as the sweep, at the deepest
    planned layer, where a restart costs least)."""
    layer, n = max(plan.layers), plan.n_examples
    n_tokens = runner.base_cache[site_name("resid_pre", layer)].shape[1]
    jobs = Jobs(torch.arange(n), torch.zeros(n, dtype=torch.long), torch.full((n,), -1), torch.full((n,), layer))
    every = PositionGroups([list(range(n_tokens))], ["every token"], "position")
    with torch.no_grad():
        output = runner.outputs("resid_pre", jobs, mask=every.mask(n_tokens))
        got = score_rows(target, output, jobs.examples, served)
    check_identity(got, m_source, lambda miss, size: (
        f"activation_patching: patching every token of blocks.{layer}.hook_resid_pre gives {float(got[0]):.4g} "
        f"where the unpatched source run gives {float(m_source[0]):.4g} (largest miss {miss:.3g}): the patched "
        "runs do not continue the forward pass the model runs (a hook the sweep does not see, or a model whose "
        "output depends on more than its residual stream); no sweep is returned"))


@naming("activation_patching")
def activation_patching(model, clean: Tensor, corrupted: Tensor, target: Any = None, *, sites=DEFAULT_SITES,
                        positions="all", heads="all", layers=None, direction: str = "denoising",
                        normalize: bool = False, reuse: bool | None = None, batch_size: int | None = None,
                        progress: bool = True, metric: Any = METRIC_UNSET) -> ResultSet:
    """Patch each (site, layer, position group[, head]) from one run into the other; score each run.

    clean, corrupted: images [batch, channels, H, W] (same shape). target: what each run is scored
    by, as every method takes it (`prisma_ext.analysis.targets`): None (each clean image's predicted
    class), a class, one per image, px.LogitDiff(a, b), px.ClassProb(c), px.ImageTextScore(texts) on
    a CLIP tower that outputs its embedding, or fn(output) -> [n] (`metric=` is its old name).
    sites: "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z" (per head).
    positions: "all", "prefix", "patches", "rows", "cols", a patch-grid mask, token indices or
    groups (`positions.resolve_positions`), on the grid of the images' own size. heads: "all" or
    indices (for "z"). layers: None (all) or indices. batch_size: patched runs per forward pass
    (default: ~100 MB of activations a chunk on a CPU, where cache-sized chunks run fastest; ~2 GB on
    a GPU). reuse: rerun only the layers from the patched one on (default: where the backend can).
    progress: a tqdm bar on stderr.
    Returns a ResultSet: site -> AnalysisResult with values [batch, layer, position] (plus a
    head axis for "z"), and meta holding the clean and corrupted target values.
    """
    target = patching_target(target, metric)
    plan = make_plan(model, clean, corrupted, sites, positions, heads, layers, direction, batch_size)
    be = plan.backend
    reuse = be.can_restart if reuse is None else reuse
    if reuse and not be.can_restart:
        raise PrismaError(f"reuse=True restarts the forward pass mid-model, which the {be.kind} backend cannot")
    restarts = [site_name("resid_pre", layer) for layer in (plan.layers if reuse else [max(plan.layers)])]
    names = list(dict.fromkeys(plan.names() + restarts))
    n = plan.n_examples
    examples = torch.arange(n)
    with torch.no_grad():
        base = be.run(plan.base_input, read=names)
        source = be.run(plan.source_input, read=names)
        clean_output = plan.clean_and_corrupted(base.output, source.output)[0]
        bound = bind(be, clean, target, clean_output, what="target, the patching metric")
        served = output_acts(be, bound)
        m_base = score_rows(bound, base.output, examples, served)
        m_source = score_rows(bound, source.output, examples, served)
    m_clean, m_corr = plan.clean_and_corrupted(m_base, m_source)

    runner = PatchRunner(plan, base.acts, source.acts, restart=reuse)
    check_everything_patched(runner, plan, bound, served, m_source)
    size = plan.chunk_size()
    per_site = {s: make_jobs(n, len(plan.groups), plan.heads if s in HEAD_SITES else None, plan.layers)
                for s in plan.sites}  # layer-major: a chunk spans one or two layers
    layer_pos = {layer: i for i, layer in enumerate(plan.layers)}
    results: dict[str, Tensor] = {}
    with torch.no_grad(), Progress(sum(map(len, per_site.values())), progress, "activation patching") as bar:
        for site, jobs in per_site.items():
            site_heads = plan.heads if site in HEAD_SITES else None
            shape = (n, len(plan.layers), *([len(site_heads)] if site_heads else []), len(plan.groups))
            out = results.setdefault(site, torch.zeros(shape))
            for chunk in jobs.chunks(size):
                value = score_rows(bound, runner.outputs(site, chunk), chunk.examples, served).float().cpu()
                li = torch.tensor([layer_pos[layer] for layer in chunk.layers.tolist()])
                if site_heads:
                    head_pos = torch.tensor([site_heads.index(h) for h in chunk.heads.tolist()])
                    out[chunk.examples, li, head_pos, chunk.groups] = value
                else:
                    out[chunk.examples, li, chunk.groups] = value
                bar.update(len(chunk))
    meta = dict(direction=direction, normalized=normalize,
                clean_metric=m_clean.float().cpu(), corrupted_metric=m_corr.float().cpu(), backend=be.kind,
                reuse=reuse, target=bound.describe())
    return plan.results(results, m_clean, m_corr, normalize, meta)
