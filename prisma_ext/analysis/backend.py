"""One interface to a model on either backend, for the analysis methods.

`Backend.of(model)` takes a HookedViT or HookedCLIP (TransformerLens backend) or a TracedViT or
TracedCLIP (nnsight backend; a CLIP's vision tower, `clip_backend`), dispatching on the model's
type, and offers:
- `run(images, read=..., edit=..., grad_of=...)`: one forward pass that reads sites (TL names,
  TL layouts), replaces some (`edit[name](value) -> new value`) and, given a scalar function of
  the output, the gradient of that scalar at each read site (an edit function with the
  attribute `changes_tokens = True` may return another number of tokens: an appended register);
- `evaluate(images, target, ...)`: a run that also scores a target (`targets.Target`);
- `restart(resid, layer, edits, rows)`: the rest of a forward pass from a layer's residual stream
  (what patching reruns after a patch), on the backends that can (`can_restart`);
- `vit`: a HookedViT with the model's weights, for weight-level quantities (`W_O`, the readout)
  and `readout` (`prisma_ext.hooked.readout.Readout`);
- the token layout, config and class names.
On the nnsight backend activations come from the original module, traced; `vit` is an
unprocessed conversion of it used only for weights (built once per model and weights), so both
backends give the same numbers.
"""

from __future__ import annotations

from ..errors import PrismaError
from .backend_base import KINDS, Backend, Edit, Run
from .backend_nnsight import NNsightBackend, weights_copy
from .backend_remote import RemoteBackend, remote_clip_backend
from .backend_tl import TextBackend, TLBackend
from .clip_backend import traced_clip_backend

__all__ = ["Backend", "Edit", "NNsightBackend", "Run", "TLBackend", "TextBackend", "weights_copy"]



def _llava_needs_a_prompt(model) -> Backend:
    raise PrismaError("a LLaVA is analysed for a prompt: pass px.llava_backend(llava, prompt_ids) (the image token "
                      "once in the prompt; output: the next-token logits) to the method, e.g. "
                      "px.activation_patching(px.llava_backend(llava, prompt), clean, corrupted, "
                      "target=px.LogitDiff(a, b))")


KINDS[:] = [
    ("prisma_ext.hooked.vit", "HookedViT", lambda m: TLBackend(m, m)),
    ("prisma_ext.hooked.clip", "HookedCLIP", lambda m: TLBackend(m, m.visual)),
    ("prisma_ext.traced.remote", "RemoteTracedCLIP", remote_clip_backend),
    ("prisma_ext.traced.remote", "RemoteTracedViT", RemoteBackend),
    ("prisma_ext.traced.clip", "TracedCLIP", traced_clip_backend),
    ("prisma_ext.traced.llava", "TracedLlava", _llava_needs_a_prompt),
    ("prisma_ext.traced.model", "TracedViT", NNsightBackend),
]
