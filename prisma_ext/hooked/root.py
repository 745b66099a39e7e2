"""What every hooked model here shares: TL's hook API with checked site names, caches keyed
relative to the model (also when it sits inside a HookedCLIP), and TL's stacked weight views."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformer_lens import ActivationCache, HookedRootModule

from ..errors import PrismaError, UnknownNameError, suggest
from .layers import CircuitViews


class CheckedHookedRoot(HookedRootModule):
    """A HookedRootModule whose hook API rejects unknown site names (with the closest ones) and
    whose `run_with_cache` returns an `ActivationCache` keyed by this model's own site names."""

    def _check_site(self, name: str | Callable) -> None:
        if isinstance(name, str) and name not in self.hook_dict:
            source = getattr(getattr(self, "cfg", None), "source", "") or type(self).__name__
            raise UnknownNameError(suggest(name, self.hook_dict, "site") + f" (model {source})")

    @property
    def site_names(self) -> list[str]:
        return list(self.hook_dict)

    def check_hooks_to_add(self, hook_point, hook_point_name, hook, dir="fwd", is_permanent=False,
                           prepend=False) -> None:
        self._check_site(hook_point_name)

    def _enable_hook_with_name(self, name: str, hook: Callable, dir) -> None:
        self._check_site(name)
        super()._enable_hook_with_name(name, hook, dir)

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        self._check_site(name)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _relative_names(self) -> dict[str, str]:
        """Full hook-point name (as a parent model named it) -> this model's own name."""
        return {hp.name: rel for rel, hp in self.hook_dict.items() if hp.name != rel}

    def run_with_cache(self, *args, names_filter=None, return_cache_object: bool = True, **kwargs):
        """TL's run_with_cache: (output, ActivationCache); unknown names in `names_filter` raise."""
        names = [names_filter] if isinstance(names_filter, str) else (
            list(names_filter) if isinstance(names_filter, (list, tuple)) else None)
        for name in names or []:
            self._check_site(name)
        if names is not None:
            full = {rel: hp.name for rel, hp in self.hook_dict.items()}
            names_filter = [full[n] for n in names]
        elif callable(names_filter):  # the filter speaks this model's names
            rel = self._relative_names()
            user_filter = names_filter
            names_filter = lambda n: user_filter(rel.get(n, n))  # noqa: E731
        out, cache = super().run_with_cache(*args, names_filter=names_filter, **kwargs)
        rel = self._relative_names()
        if rel:
            cache = {_rekey(k, rel): v for k, v in cache.items()}
        if return_cache_object:
            cache = ActivationCache(cache, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))
        return out, cache


def _rekey(key: str, rel: dict[str, str]) -> str:
    if key.endswith("_grad") and key[:-5] in rel:
        return rel[key[:-5]] + "_grad"
    return rel.get(key, key)


class TowerWeightViews(CircuitViews):
    """TL's stacked weight views over `self.blocks` ([layer, head, ...]) and accumulated biases."""

    def _stack(self, attr: str, part: str = "attn") -> Tensor:
        return torch.stack([getattr(getattr(b, part), attr) for b in self.blocks])

    W_Q = property(lambda self: self._stack("W_Q"))
    W_K = property(lambda self: self._stack("W_K"))
    W_V = property(lambda self: self._stack("W_V"))
    W_O = property(lambda self: self._stack("W_O"))
    b_Q = property(lambda self: self._stack("b_Q"))
    b_K = property(lambda self: self._stack("b_K"))
    b_V = property(lambda self: self._stack("b_V"))
    b_O = property(lambda self: self._stack("b_O"))
    W_in = property(lambda self: self._stack("W_in", "mlp"))
    W_out = property(lambda self: self._stack("W_out", "mlp"))
    b_in = property(lambda self: self._stack("b_in", "mlp"))
    b_out = property(lambda self: self._stack("b_out", "mlp"))

    def accumulated_bias(self, layer: int, mlp_input: bool = False,
                         include_mlp_biases: bool = True) -> Tensor:
        """Sum of the attention and MLP output biases written before `layer` [d_model]."""
        ref = self.blocks[0].attn.b_O
        total = torch.zeros(self.cfg.d_model, device=ref.device, dtype=ref.dtype)
        for i in range(layer):
            total = total + self.blocks[i].attn.b_O
            if include_mlp_biases:
                total = total + self.blocks[i].mlp.b_out
        if mlp_input:
            if layer >= self.cfg.n_layers:
                raise PrismaError(f"mlp_input needs layer < {self.cfg.n_layers}, got {layer}")
            total = total + self.blocks[layer].attn.b_O
        return total
