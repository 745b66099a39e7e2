"""Running patched forward passes, chunk by chunk, and scoring them with the bound target.

`PatchRunner.outputs(site, jobs)` runs one chunk of patched runs: each row is the base input
with one position group (and head) of one site replaced by the source run's value, at the row's
own layer (one forward pass for runs of several layers, so a sweep takes about runs / chunk
passes). Where the backend can restart mid-model (`Backend.restart`), the rows start at the
chunk's first patched layer from the base run's cached residual stream instead of at the input.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ...errors import PrismaError
from ..backend import Backend
from ..backend_base import Replace
from ..targets import Target
from .plan import Jobs, Plan, site_name


def patch_edit(source: Tensor, rows: Tensor, token_mask: Tensor, heads: Tensor) -> Replace:
    """The edit that replaces, row by row, the masked tokens (and one head, where heads >= 0) of
    a value [n, pos, ...] with source[rows] (source [examples, pos, ...]: each example's value
    once; rows [n]: the example of each row); token_mask [n, pos]; heads [n]."""
    mask, heads = token_mask.to(source.device), heads.to(source.device)
    if source.ndim == 4:  # [n, pos, head, d_head]
        head_mask = torch.ones(len(rows), source.shape[2], dtype=torch.bool, device=source.device)
        picked = heads >= 0
        if picked.any():
            head_mask[picked] = torch.nn.functional.one_hot(heads[picked], source.shape[2]).bool()
        mask = mask[:, :, None] & head_mask[:, None, :]
    while mask.ndim < source.ndim:
        mask = mask.unsqueeze(-1)
    return Replace(mask, source, rows)


def output_acts(backend: Backend, target: Target) -> dict[str, str]:
    """The sites `target` reads, each served by the run's output (patched runs keep only their
    output): {site: "output"}, or a PrismaError when the output is not that site."""
    missing = [s for s in target.sites if s != backend.output_site]
    if missing:
        raise PrismaError(
            f"{target.describe()} as a patching target reads {', '.join(missing)}, but patching sees only "
            "the model's output, and here it is not the image embedding (a zero-shot head is set, or this is "
            "not a CLIP vision tower). Use image_text_patching(clip, clean, corrupted, texts), or the CLIP "
            "model without a zero-shot head, or a class / LogitDiff of the zero-shot head")
    return {s: "output" for s in target.sites}


def score_rows(target: Target, output: Tensor, rows: Tensor, served: Mapping[str, str]) -> Tensor:
    """The bound target's score of each output row [n]; row i belongs to example rows[i]."""
    return target.score(output, {site: output for site in served}, rows=rows)


class PatchRunner:
    """The patched forwards of a plan, given the base and source runs' cached site values."""

    def __init__(self, plan: Plan, base_cache: dict[str, Tensor], source_cache: dict[str, Tensor],
                 restart: bool):
        self.plan, self.base_cache, self.source_cache, self.restart = plan, base_cache, source_cache, restart
        n_tokens = next(iter(base_cache.values())).shape[1]
        self.group_mask = plan.groups.mask(n_tokens)

    def outputs(self, site: str, jobs: Jobs, mask: Tensor | None = None) -> Tensor:
        """The outputs [len(jobs), ...] of one chunk of patched runs at `site`, row i patched at
        layer `jobs.layers[i]` (rows are unchanged at the other layers' edits); with a restart,
        every row starts at the chunk's first layer from the base run's residual stream, which
        the rows of later layers carry unpatched up to their own layer. `mask` [n_groups, pos]:
        other position groups than the plan's."""
        be, examples = self.plan.backend, jobs.examples
        token_mask = (self.group_mask if mask is None else mask)[jobs.groups]
        layers = sorted(set(jobs.layers.tolist()))
        used = torch.unique(examples)  # each example's source once; rows index into them
        rows = torch.searchsorted(used, examples.contiguous())
        edits = {}
        for layer in layers:
            name = site_name(site, layer)
            mask = token_mask & (jobs.layers == layer)[:, None]
            edits[name] = patch_edit(self.source_cache[name][used], rows, mask, jobs.heads)
        images = self.plan.base_input[examples]
        if not self.restart:
            return be.run(images, edit=edits).output
        start = layers[0]
        resid = self.base_cache[site_name("resid_pre", start)][examples]
        if site == "resid_pre":
            resid = edits.pop(site_name("resid_pre", start))(resid)
        return be.restart(resid, start, edits, examples, images)
