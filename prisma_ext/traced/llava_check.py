"""`px.load`'s check of a traced LLaVA: what the sites read against what transformers computes.

On a seeded probe (two images, a prompt of the image's tokens and two more), in eval mode and
without gradients: every mapped site is read once in one trace (a site map that does not fit the
module fails here), then `visual.blocks.0.hook_resid_pre` and each `visual.blocks.{i}.hook_resid_post`
must equal the tower's own `hidden_states[0]` / `[i + 1]` (the last one: `ln_final` where the
config ties it to SigLIP's `post_layernorm`), `visual.hook_image_features` the
hidden states the config selects (`projector_reads`), `visual.hook_projected` the features
`get_image_features` returns, and the trace's logits the module's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._state import eval_mode
from ..sitemaps.hf_llava import feature_site


def reference(model: Any, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """What transformers computes on `inputs`, by site name (the tower's residual stream, the
    projector's input and output) plus "logits"."""
    module = model._module
    tower = module.model.vision_tower
    images = inputs["pixel_values"]
    hidden = tower(pixel_values=images, output_hidden_states=True).hidden_states
    out = {feature_site(tower, k): h for k, h in enumerate(hidden)}  # the last may be tied to the final norm
    reads = model.projector_reads
    out["visual.hook_image_features"] = torch.cat([hidden[k][:, reads.first_token:] for k in reads.layers], -1)
    features = module.model.get_image_features(pixel_values=images).pooler_output
    out["visual.hook_projected"] = torch.stack(list(features))
    out["logits"] = module(**inputs).logits
    return out


def verify_llava(model: Any, source: str) -> None:
    """Raise VerificationError naming the first site (in forward order) that differs."""
    from ..verification import SEED, VerificationError, gap, probe_images, tolerance

    module = model._module
    param = next(module.parameters())
    images = probe_images(model.cfg, param.device, param.dtype)
    gen = torch.Generator().manual_seed(SEED + 2)
    vocab = module.config.text_config.vocab_size
    extra = [t for t in torch.randint(0, vocab, (4,), generator=gen).tolist() if t != model.image_token_id][:2]
    inputs = model.inputs(images, [model.image_token_id, *extra])
    with eval_mode(module), torch.no_grad():
        try:
            output, sites = model.run_with_cache(**inputs)
        except Exception as err:
            raise VerificationError(f"px.load: reading every mapped site of {source} once on a probe fails "
                                    f"({type(err).__name__}: {err}): the site map does not fit the module; "
                                    "px.load(..., verify=False) skips the check") from err
        want = reference(model, inputs)
    sites = dict(sites, logits=output.logits)
    for name, value in sites.items():
        if name not in want:
            continue
        ref = want[name]
        if gap(value, ref) > tolerance(ref):
            raise VerificationError(
                f"px.load: {name} of the traced {source} differs from what transformers computes by "
                f"{gap(value, ref):.3g} (shapes {tuple(value.shape)} and {tuple(ref.shape)}): the site map reads "
                "another tensor than the site holds; px.load(..., verify=False) skips the check")
