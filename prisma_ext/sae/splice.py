"""Splice an SAE into a hooked model (the TL backend) at its site, for the length of a `with`.

    with splice(model, sae, "blocks.2.hook_resid_post", use_error_term=True):
        logits, cache = model.run_with_cache(images)
        cache["blocks.2.hook_resid_post.hook_sae_acts_post"]       # [batch, token, d_sae]
        model.run_with_hooks(images, fwd_hooks=[("blocks.2.hook_resid_post.hook_sae_acts_post", ablate)])

Inside, the site's value is replaced by the SAE's output (its reconstruction, plus the error
term with `use_error_term`, so that without an edit the model computes what it computed before)
and the SAE's hook points sit under the site's name as SAELens names them: `hook_sae_input`,
`hook_sae_acts_pre`, `hook_sae_acts_post`, `hook_sae_recons`, `hook_sae_error`,
`hook_sae_output`. The site itself stays a hook point, on the spliced value. On leaving, even
after an error, the original hook point is back, every hook added inside is gone, and the SAE's
`use_error_term` is as it was. The SAE's parameters are not added to the model's.

On a traced model (`px.load(..., backend="nnsight")`: TracedViT, TracedCLIP) the same `with` does
the same through nnsight (`prisma_ext.sae.splice_traced`): inside, a forward, `trace`,
`run_with_cache` and the analysis layer's `Backend.run` go through the SAE, and its values are
sites by the same names (`model.site(f"{site}.hook_sae_acts_post")` in a trace). A spliced traced
model cannot trace remotely (`remote=` is refused inside the `with`): the SAE runs in the forward.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..errors import InputError, UnknownNameError, suggest
from .dictionary import SAE_HOOKS, SparseAutoencoder


class SplicedSite(HookPoint):
    """A site's hook point whose value goes through an SAE; the SAE's hook points are its children
    (the SAE itself is held without being registered, so the model's parameters stay its own).
    It always counts as hooked: a layer that skips unhooked sites (a LayerNorm's fused kernel
    when nobody hooks `hook_normalized`, SDPA when nobody hooks `hook_pattern`) still calls it."""

    def __init__(self, sae: SparseAutoencoder):
        super().__init__()
        object.__setattr__(self, "sae", sae)
        for name in SAE_HOOKS:
            self.add_module(name, getattr(sae, name))
        self.register_forward_pre_hook(_keep_hooked)

    def forward(self, x: Tensor) -> Tensor:
        return self.sae(x)


def _keep_hooked(module: nn.Module, args: tuple) -> None:
    """A no-op pre-hook that makes `norms.is_hooked` see the spliced site (see `SplicedSite`)."""


def _parent(model: nn.Module, site: str) -> tuple[nn.Module, str]:
    path, _, attr = site.rpartition(".")
    parent = model.get_submodule(path) if path else model
    return parent, attr


@contextmanager
def splice(model: Any, sae: SparseAutoencoder, site: str, use_error_term: bool = False) -> Iterator[Any]:
    """Run `model` (a HookedViT, HookedCLIP tower or any HookedRootModule; or a TracedViT /
    TracedCLIP) with `sae` at `site` inside the `with` (see the module docstring). Refused: a
    site the model does not have, an SAE whose d_in is not the site's width, a site already
    spliced, on the TL backend a site with hooks attached, on the nnsight backend remote tracing
    and a site that is not a module's input or output."""
    if not isinstance(sae, SparseAutoencoder):
        raise InputError(f"splice: expected a SparseAutoencoder, got {type(sae).__name__}")
    if _is_traced(model):
        from .splice_traced import splice_traced

        with splice_traced(model, sae, site, use_error_term):
            yield model
        return
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise InputError(f"splice: {type(model).__name__} is not a hooked model (the TL backend) nor a traced one "
                         "(the nnsight backend); load it with px.load(...) (backend='tl' or 'nnsight')")
    if site not in hook_dict:
        raise UnknownNameError(f"splice: {suggest(site, list(hook_dict), 'site')}")
    original = hook_dict[site]
    if isinstance(original, SplicedSite):
        raise InputError(f"splice: {site} already has an SAE spliced in")
    if original._forward_hooks or original._backward_hooks:
        raise InputError(f"splice: {site} has hooks attached; remove them (model.reset_hooks()) before splicing")
    width = _site_width(model, site)
    if width is not None and width != sae.d_in:
        raise InputError(f"splice: the SAE reads d_in={sae.d_in} but {site} is {width} wide")
    parent, attr = _parent(model, site)
    wrapper = SplicedSite(sae)
    saved_error_term = sae.use_error_term
    sae.use_error_term = use_error_term
    setattr(parent, attr, wrapper)
    model.setup()
    try:
        yield model
    finally:
        wrapper.remove_hooks("both", including_permanent=True)
        for name in SAE_HOOKS:
            getattr(sae, name).remove_hooks("both", including_permanent=True)
        setattr(parent, attr, original)
        model.setup()
        sae.setup()  # its hook points' names are its own again
        sae.use_error_term = saved_error_term


def _is_traced(model: Any) -> bool:
    """A model of the nnsight backend (without importing nnsight where nothing traced exists)."""
    traced = sys.modules.get("prisma_ext.traced.model")
    return traced is not None and isinstance(model, traced.TracedModel)


def _site_width(model: Any, site: str) -> int | None:
    """The last dimension of `site` at batch size 1, if the model lists its sites' shapes."""
    shapes = getattr(model, "site_shapes", None)
    if shapes is None:
        return None
    shape = shapes().get(site)
    return int(shape[-1]) if shape else None
