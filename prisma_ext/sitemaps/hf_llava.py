"""Hugging Face LLaVA (`LlavaForConditionalGeneration`): the vision tower's sites under the names a
CLIP's image tower has (`visual.…`), the projector, and the language model's residual stream.

    LlavaForConditionalGeneration
      model.vision_tower            CLIPVisionModel or SiglipVisionModel: `sitemaps.hf` /
                                    `sitemaps.hf_siglip`'s map of that class, under this path
      model.multi_modal_projector   Linear-act-Linear over the selected hidden states:
                                    `visual.hook_image_features` (its input) and
                                    `visual.hook_projected` (its output, the image tokens the LM reads)
      model.language_model          a Llama-style decoder: `lm.blocks.{i}.hook_resid_pre|mid|post`,
                                    `ln1`, `ln2`, `hook_attn_out`, `hook_mlp_out`, `lm.ln_final`
      lm_head                       the unembedding (the model's output logits)

The projector reads `hidden_states[vision_feature_layer]` of the tower (`projector_input` says
which site that is: index 0 is `blocks.0.hook_resid_pre`, index k > 0 `blocks.{k-1}.hook_resid_post`,
so the default -2 is the second-to-last block's output, not the last), without the first token
under `vision_feature_select_strategy="default"` (CLIP's class token; for a tower without one,
its first patch). transformers collects those hidden states with forward hooks on the layers, so
it keeps block k-1's output tensor itself: the tower's `blocks.{k}.hook_resid_pre` sites are
`in_place` (an assignment copies into that tensor), so an edit there reaches the projector as an
edit of `blocks.{k-1}.hook_resid_post` does (they are one tensor). Nothing here imports nnsight
or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .builder import BlockSites, SiteMap
from .spec import Site, TupleItem, Undo

TOWER = "model.vision_tower"
PROJECTOR = "model.multi_modal_projector"
LM = "model.language_model"
TOWER_CLASSES = ("CLIPVisionModel", "SiglipVisionModel")
STRATEGIES = ("default", "full")
# a Llama-style decoder layer's submodules (Llama, Mistral, Qwen2, ...)
LM_LAYER = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass(frozen=True)
class Rebased:
    """A site's prepare step written for a submodule (`inner(submodule)`), run from the root:
    `inner(root.get_submodule(path))`. Returns the inner step's undo."""

    path: str
    inner: Any

    def __call__(self, root: nn.Module) -> Undo | None:
        return self.inner(root.get_submodule(self.path))


def rebase(sites: dict[str, Site], path: str) -> dict[str, Site]:
    """A site map of the submodule at `path` as a map of the root module: every module path
    prefixed, every prepare step run on that submodule."""
    out = {}
    for name, site in sites.items():
        module = f"{path}.{site.module}" if site.module else path
        prepare = Rebased(path, site.prepare) if site.prepare is not None else None
        out[name] = replace(site, module=module, prepare=prepare)
    return out


def tower_sites(tower: nn.Module, prefix: str = "visual.") -> dict[str, Site]:
    """The site map of a `CLIPVisionModel` / `SiglipVisionModel` (relative to it) under `prefix`,
    without what LLaVA never computes: no contrastive embedding (`hook_image_embed`), and no
    `hook_pooled` for a SigLIP tower built without its attention-pool head."""
    kind = type(tower).__name__
    if kind == "CLIPVisionModel":
        from .hf import hf_clip_vision_sites

        sites = hf_clip_vision_sites(tower, prefix)
    elif kind == "SiglipVisionModel":
        from .hf_siglip import hf_siglip_vision_sites

        sites = hf_siglip_vision_sites(tower, prefix)
    else:
        raise UnsupportedModelError(f"a LLaVA vision tower of class {kind} is not supported; supported: "
                                    f"{', '.join(TOWER_CLASSES)}")
    names = dict(tower.named_modules())
    return {name: site for name, site in sites.items()
            if not name.endswith("hook_image_embed") and site.module in names}


def llama_like(lm: nn.Module) -> bool:
    """Whether the language model's layers are Llama-style pre-norm layers (`LM_LAYER`)."""
    layers = getattr(lm, "layers", None)
    return (isinstance(layers, nn.ModuleList) and len(layers) > 0 and hasattr(lm, "norm")
            and all(hasattr(layers[0], part) for part in LM_LAYER))


def lm_sites(lm: nn.Module, path: str = LM, prefix: str = "lm.") -> dict[str, Site]:
    """The residual stream of a Llama-style decoder at `path`: per layer its input and output,
    the norms' outputs, what each branch adds, the stream between them; then the final norm.
    Empty for other decoders (reach them with nnsight's own `model.model.language_model...`)."""
    if not llama_like(lm):
        return {}
    sites = SiteMap(prefix)
    for i in range(len(lm.layers)):
        p = f"{path}.layers.{i}"
        sites.block(i, BlockSites(
            resid_pre=Site(p, "input"), ln1=Site(f"{p}.input_layernorm"),
            attn_out=Site(f"{p}.self_attn", view=TupleItem(0)),
            resid_mid=Site(f"{p}.post_attention_layernorm", "input", in_place=True),
            ln2=Site(f"{p}.post_attention_layernorm"), mlp_out=Site(f"{p}.mlp"),
            resid_post=Site(p, view=TupleItem(0))))
    sites.add("ln_final.hook_normalized", Site(f"{path}.norm"))
    return sites.done()


def hf_llava_sites(model: nn.Module) -> dict[str, Site]:
    """`LlavaForConditionalGeneration`, in forward order: the tower (`visual.`), the projector,
    the language model (`lm.`)."""
    inner = model.model
    sites = rebase(tower_sites(inner.vision_tower), TOWER)
    for name, site in sites.items():  # one tensor with the block before's output, which transformers keeps
        if name.endswith(".hook_resid_pre"):
            sites[name] = replace(site, in_place=True)
    sites["visual.hook_image_features"] = Site(PROJECTOR, "input", shape="[batch, n_image_tokens, d_vision * n_layers]")
    sites["visual.hook_projected"] = Site(PROJECTOR, shape="[batch, n_image_tokens, d_lm]")
    sites.update(lm_sites(inner.language_model))
    return sites


# ------------------------------------------------------------------ what the projector reads
@dataclass(frozen=True)
class ProjectorInput:
    """What `visual.hook_image_features` is made of: the tower sites `sites` (one per
    `vision_feature_layer`), each cut to the tokens `first_token:`, concatenated on the last axis
    (a list of feature layers: in that order). `layers`: the hidden-state indices transformers
    picks, resolved to [0, n_layers]."""

    sites: tuple[str, ...]
    first_token: int
    layers: tuple[int, ...]
    strategy: str

    def describe(self) -> str:
        cut = "[:, 1:]" if self.first_token else ""
        parts = " ++ ".join(f"{s}{cut}" for s in self.sites)
        return f"{parts} (vision_feature_layer -> hidden_states{list(self.layers)}, strategy {self.strategy!r})"


def feature_site(tower: nn.Module, index: int, prefix: str = "visual.") -> str:
    """The site equal to `hidden_states[index]` of the tower (`index` as in `vision_feature_layer`,
    negative allowed): 0 is the first block's input, k > 0 block k-1's output. A config with
    `tie_last_hidden_states=True` makes the last one the tower's `last_hidden_state` (SigLIP's is
    after `post_layernorm`: `ln_final.hook_normalized`)."""
    n_layers = tower.config.num_hidden_layers
    n = n_layers + 1
    if not -n <= index < n:
        raise UnsupportedModelError(f"vision_feature_layer {index} is out of range for a vision tower of "
                                    f"{n_layers} layers ({n} hidden states: -{n} to {n - 1})")
    k = index % n
    if k == 0:
        return f"{prefix}blocks.0.hook_resid_pre"
    tied = bool(getattr(tower.config, "tie_last_hidden_states", False))
    if tied and k == n_layers and type(tower).__name__ == "SiglipVisionModel":
        return f"{prefix}ln_final.hook_normalized"
    return f"{prefix}blocks.{k - 1}.hook_resid_post"


def projector_input(model: nn.Module) -> ProjectorInput:
    """Which tower sites the projector of `LlavaForConditionalGeneration` reads (its config's
    `vision_feature_layer` and `vision_feature_select_strategy`)."""
    cfg, tower = model.config, model.model.vision_tower
    strategy = cfg.vision_feature_select_strategy
    if strategy not in STRATEGIES:
        raise UnsupportedModelError(f"vision_feature_select_strategy {strategy!r} is not supported; supported: "
                                    f"{', '.join(STRATEGIES)}")
    layer = cfg.vision_feature_layer
    layers = [layer] if isinstance(layer, int) else list(layer)
    n = tower.config.num_hidden_layers + 1
    sites = tuple(feature_site(tower, i) for i in layers)
    return ProjectorInput(sites, 1 if strategy == "default" else 0, tuple(i % n for i in layers), strategy)
