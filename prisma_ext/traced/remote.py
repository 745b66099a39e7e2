"""Remote tracing (NDIF) of Hugging Face CLIP and ViT models named by repo id.

nnsight runs a trace remotely only for a `Remotable` model: the request carries the trace body
and a model key, `"<import path of the class>:<JSON with repo id and revision>"`, and the server
rebuilds the model from that key (`Remotable.from_model_key`) and runs the body against its own
copy. `RemoteTracedCLIP` is that class for `CLIPModel` / `CLIPVisionModel` checkpoints: nnsight's
`HuggingFaceModel` (build on the meta device from the repo's config, load weights on the first
local trace, key = repo id + revision) with `TracedCLIP`'s site names. `RemoteTracedViT` is the
same for `ViTForImageClassification` checkpoints (model type "vit"), with `TracedViT`'s
(HookedViT's) site names.

    clip = px.load("hf:openai/clip-vit-base-patch32", backend="nnsight", remote=True)
    with clip.trace(input_ids=tokens, pixel_values=images):    # runs on NDIF
        resid = clip.site("visual.blocks.6.hook_resid_post").save()

The key names `prisma_ext.traced.remote.RemoteTracedCLIP`: a server can only rebuild it where
prisma-ext is installed and that checkpoint is deployed under this class (see docs/nnsight.md).
`remote="local"` runs nnsight's local simulation of the round trip (serialise, rebuild the body
without the caller's local modules, run, return), which needs the weights here.
"""

from __future__ import annotations

import os
from typing import Any

from nnsight.modeling.huggingface import HuggingFaceModel

from ..errors import PrismaError
from .clip import TracedCLIP
from .model import TracedViT


class _RemoteHF:
    """What the remote classes share: nnsight's `HuggingFaceModel` built from a repo id, bound to
    an adapter's sites, with a default `remote` for `trace` and a refusal of local folders."""

    KINDS = "checkpoints"
    ARCHITECTURES: tuple[str, ...] = ()  # if set: what the checkpoint's config must name

    def _px_kind(self) -> str:
        """The checkpoint's class: what its config names for ARCHITECTURES, else the built one."""
        named = getattr(self._module.config, "architectures", None) or []
        if self.ARCHITECTURES and named and not set(named) & set(self.ARCHITECTURES):
            return named[0]
        return type(self._module).__name__

    def _px_adapter_class(self) -> type:
        raise NotImplementedError

    def __init__(self, repo_id: str, *args: Any, revision: str | None = None,
                 remote: bool | str = False, **kwargs: Any):
        HuggingFaceModel.__init__(self, repo_id, *args, revision=revision, **kwargs)
        adapter = self._px_adapter_class()()
        kind = self._px_kind()
        if not adapter.matches(self._module) or kind != type(self._module).__name__:
            raise PrismaError(f"hf:{repo_id} is a {kind}; remote tracing takes "
                              f"{self.KINDS}")
        adapter.check(self._module)
        self._px_bind(self._module, adapter)
        self.default_remote = remote

    def trace(self, *inputs: Any, remote: bool | str | None = None, **kwargs: Any):
        """nnsight's trace; `remote` defaults to the model's `default_remote`."""
        remote = self.default_remote if remote is None else remote
        return super().trace(*inputs, remote=remote, **kwargs)

    def dispatch(self) -> None:
        """Load the real weights (first local trace) and re-read the config from them."""
        was = self.dispatched
        super().dispatch()
        if not was:
            self._px_config = self.adapter.config(self._module)

    def _remoteable_model_key(self) -> str:
        if os.path.isdir(str(self.repo_id)):
            raise PrismaError(
                f"{self.repo_id!r} is a local folder: a remote server rebuilds the model from a Hugging "
                "Face repo id (the key names only the id and revision), so a folder cannot run remotely; "
                "use remote='local' to simulate the round trip here")
        return super()._remoteable_model_key()


class RemoteTracedCLIP(_RemoteHF, TracedCLIP, HuggingFaceModel):
    """A Hugging Face CLIP checkpoint (repo id or saved folder) as a `Remotable` `TracedCLIP`.

    Built on the meta device (no weights) unless `dispatch=True`; a local trace loads the
    weights first. `remote` is the default for `trace(...)`: False (local), True (NDIF, API key
    from nnsight's config: `nnsight.CONFIG.set_default_api_key(...)` or `NDIF_API_KEY`) or
    "local" (simulated round trip); `trace(..., remote=...)` overrides it per trace.
    """

    AUTO_CLASS = "AutoModel"  # CLIPConfig -> CLIPModel, CLIPVisionConfig -> CLIPVisionModel
    KINDS = "CLIPModel and CLIPVisionModel checkpoints"

    def _px_adapter_class(self) -> type:
        from ..adapters.hf_clip import HFCLIPAdapter

        return HFCLIPAdapter


class RemoteTracedViT(_RemoteHF, TracedViT, HuggingFaceModel):
    """A Hugging Face `ViTForImageClassification` checkpoint (repo id or saved folder) as a
    `Remotable` `TracedViT` (HookedViT's site names); otherwise as `RemoteTracedCLIP`."""

    AUTO_CLASS = "AutoModelForImageClassification"  # ViTConfig -> ViTForImageClassification
    KINDS = "ViTForImageClassification checkpoints"
    ARCHITECTURES = ("ViTForImageClassification",)

    def _px_adapter_class(self) -> type:
        from ..adapters.hf_vit import HFViTAdapter

        return HFViTAdapter


def load_remote(source: Any, pretrained: Any, remote: bool | str, options: dict, kwargs: dict
                ) -> RemoteTracedCLIP | RemoteTracedViT:
    """`px.load(..., backend="nnsight", remote=...)`: a `RemoteTracedCLIP` (CLIP checkpoints) or
    `RemoteTracedViT` (model type "vit") for "hf:REPO_ID"."""
    if not (isinstance(source, str) and source.startswith("hf:")):
        what = source if isinstance(source, str) else f"a {type(source).__name__} instance"
        raise PrismaError(
            f"remote tracing needs a Hugging Face CLIP or ViT repo id ('hf:org/name'), got {what}: the "
            "server rebuilds the model from its id and hosted weights, so a module built here cannot be sent")
    if pretrained is not True:
        raise PrismaError("remote tracing runs the checkpoint's published weights: leave pretrained=True")
    unknown = sorted(set(options) | (set(kwargs) - {"revision"}))
    if unknown:
        raise PrismaError(f"remote loading takes only revision=..., got {unknown}")
    repo_id, revision = source[len("hf:"):], kwargs.get("revision")
    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(repo_id, revision=revision).model_type
        cls = RemoteTracedViT if model_type == "vit" else RemoteTracedCLIP
        return cls(repo_id, revision=revision, remote=remote)
    except OSError as err:
        raise PrismaError(
            f"could not read the config of hf:{repo_id} ({type(err).__name__}: {err}). Remote tracing "
            "builds the model's skeleton here from the repo's config.json (no weights): the Hub, or a "
            "cached copy of the config, must be reachable") from err
