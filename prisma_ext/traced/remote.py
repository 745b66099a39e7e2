"""Remote tracing (NDIF) of Hugging Face CLIP and ViT models named by repo id.

nnsight runs a trace remotely only for a `Remotable` model: the request carries the trace body,
the model envoy it refers to (pickled; modules and interleaver by reference) and a model key,
`"<import path of a class>:<JSON: repo id, revision, ...>"`, from which the server rebuilds the
model (`Remotable.from_model_key`). A server has torch, transformers and nnsight, not
prisma-ext, so:

- the key names nnsight's own class: `HuggingFaceModel` for `CLIPModel` / `CLIPVisionModel`
  checkpoints (AutoModel builds exactly these), `TransformersModel` with task
  "image-classification" for `ViTForImageClassification` (AutoModel would build a `ViTModel`,
  another module tree);
- the envoy pickles as `remote_envoy.RemoteSitesHF` / `RemoteSitesTransformers`, shipped by value
  (their source travels with the request), with a plain site table translated here from the
  adapter's site map (`wire_sites`); the attention pattern is served by an eager attention
  function shipped the same way (`remote_views.explicit_attention_on`).

`RemoteTracedCLIP` / `RemoteTracedViT` are what `px.load("hf:...", backend="nnsight", remote=...)`
returns: that wire class with `TracedCLIP`'s / `TracedViT`'s client-side API (cfg, layout,
preprocess, run_with_cache) on top, whose prisma-ext state stays here. Built on the meta device
(no weights); a local or simulated trace loads the weights first.

    clip = px.load("hf:openai/clip-vit-base-patch32", backend="nnsight", remote=True)
    with clip.trace(input_ids=tokens, pixel_values=images):    # runs on NDIF
        resid = clip.site("visual.blocks.6.hook_resid_post").save()
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from nnsight.modeling.huggingface import HuggingFaceModel
from nnsight.modeling.transformers import TransformersModel
from torch import Tensor

from .._state import eval_mode, lock_of
from ..errors import PrismaError
from ..sitemaps import spec
from ..sitemaps.attention import ExplicitHFAttention
from .clip import TracedCLIP
from .model import TracedViT, envoy_path
from .remote_envoy import RemoteSitesHF, RemoteSitesTransformers, ship_by_value

# Envoy.trace / Remotable.trace options: not inputs of the forward
_TRACE_OPTIONS = {"fn", "backend", "tracer_cls", "trace", "blocking", "job_id", "verbose"}


def wire_view(view: spec.View) -> tuple | None:
    """A `sitemaps.spec` view as the plain tuple `remote_views` reads (None: no remote form)."""
    kind = type(view)
    if kind is spec.View:
        return ("identity",)
    plain = {spec.Heads: lambda v: ("heads", v.n_heads),
             spec.Chunk: lambda v: ("chunk", v.index, v.n_chunks, v.n_heads),
             spec.SwapAxes: lambda v: ("swap_axes", v.a, v.b),
             spec.Half: lambda v: ("half", v.index),
             spec.Unsqueeze: lambda v: ("unsqueeze", v.dim),
             spec.TupleItem: lambda v: ("tuple_item", v.index),
             spec.ConvTokens: lambda v: ("conv_tokens",),
             spec.FlattenGrid: lambda v: ("flatten_grid",)}.get(kind)
    return plain(view) if plain else None


def wire_sites(sites: dict[str, spec.Site]) -> dict[str, dict]:
    """An adapter's site map as the plain site table a remote envoy carries (see
    `remote_envoy`); a site that needs prisma-ext code in the forward pass is kept, by name,
    with the reason it cannot run remotely."""
    table = {}
    for name, site in sites.items():
        view = wire_view(site.view)
        attention = (isinstance(site.prepare, ExplicitHFAttention) and site.prepare.module == site.module
                     and site.port == "pattern")
        refused = ""
        if view is None:
            refused = f"its view {type(site.view).__name__} has no remote form"
        elif site.prepare is not None and not attention:
            refused = f"its prepare step ({type(site.prepare).__name__}) is prisma-ext code a server does not have"
        elif site.port not in ("output", "input") and not attention:
            refused = f"its value {site.port!r} is served by a prisma-ext forward a server does not have"
        table[name] = dict(module=site.module, envoy=envoy_path(site.module) if site.module else "",
                           port=site.port, view=view or ("identity",), shape=site.shape,
                           in_place=bool(site.in_place), copy=bool(site.copy), attention=attention,
                           refused=refused)
    return table


def model_key(model: Any, allow_folder: bool = False) -> str:
    """The remote key of `model` (`to_model_key`): nnsight's class and its JSON suffix. A saved
    folder is refused (a server rebuilds from a Hub repo id) unless `allow_folder`, which keys it
    by its path, for emulating a server on this machine."""
    cls = model._remoteable_class()
    repo = str(model.repo_id)
    if not os.path.isdir(repo):
        suffix = cls._remoteable_model_key(model)
    elif not allow_folder:
        raise PrismaError(
            f"{repo!r} is a local folder: a remote server rebuilds the model from a Hugging Face repo id (the "
            "key names only the id and revision), so a folder cannot run remotely; use remote='local' to "
            "simulate the round trip here")
    else:
        from nnsight.modeling import huggingface

        known = repo in huggingface._ID_CACHE
        huggingface._ID_CACHE.setdefault(repo, repo)  # nnsight's canonical id lookup asks the Hub
        try:
            suffix = cls._remoteable_model_key(model)
        finally:
            if not known:
                huggingface._ID_CACHE.pop(repo, None)
    from nnsight.util import to_import_path

    return f"{to_import_path(cls)}:{suffix}"


class _RemoteClient:
    """The client side of a remote model: build from a repo id, bind the adapter's sites (kept
    here) and their wire table (sent), default `remote` for `trace`, refuse local folders."""

    KINDS = "checkpoints"
    ARCHITECTURES: tuple[str, ...] = ()  # if set: what the checkpoint's config must name

    def __init__(self, repo_id: str, *args: Any, revision: str | None = None,
                 remote: bool | str = False, **kwargs: Any):
        ship_by_value()
        self._px_build(repo_id, *args, revision=revision, **kwargs)
        adapter = self._px_adapter_class()()
        kind = self._px_kind()
        if not adapter.matches(self._module) or kind != type(self._module).__name__:
            raise PrismaError(f"hf:{repo_id} is a {kind}; remote tracing takes {self.KINDS}")
        adapter.check(self._module)
        self._px_bind(self._module, adapter)
        self._rs_init(wire_sites(self._px_sites), self._px_input_names(), self.__dict__.get("_px_prefixes"))
        self.default_remote = remote

    def _px_build(self, repo_id: str, *args: Any, revision: str | None, **kwargs: Any) -> None:
        raise NotImplementedError

    def _px_bind(self, module: Any, adapter: Any) -> None:
        """As TracedModel's; the configs' device is "cpu" where the module is on meta (inputs are
        made here and travel with the request; the server moves them to its device)."""
        import dataclasses

        super()._px_bind(module, adapter)
        for key in ("_px_config", "_px_text_config"):
            cfg = self.__dict__.get(key)
            if cfg is not None and torch.device(cfg.device).type == "meta":
                self.__dict__[key] = dataclasses.replace(cfg, device="cpu")

    def _px_adapter_class(self) -> type:
        raise NotImplementedError

    def _px_input_names(self) -> tuple[str | None, str | None]:
        raise NotImplementedError

    def _px_kind(self) -> str:
        """The checkpoint's class: what its config names for ARCHITECTURES, else the built one."""
        named = getattr(self._module.config, "architectures", None) or []
        if self.ARCHITECTURES and named and not set(named) & set(self.ARCHITECTURES):
            return named[0]
        return type(self._module).__name__

    def trace(self, *inputs: Any, remote: bool | str | None = None, **kwargs: Any):
        """nnsight's trace; `remote` defaults to the model's `default_remote`. The trace's own
        inputs are checked here first (image size, token ids), before anything is sent."""
        remote = self.default_remote if remote is None else remote
        self._px_check_inputs(inputs, {k: v for k, v in kwargs.items() if k not in _TRACE_OPTIONS})
        if remote is True and kwargs.get("backend") is None:  # to NDIF (not a backend of the caller's own)
            self._remoteable_model_key()  # a local folder is refused first: no server can rebuild it
            check_api_key()
        return super().trace(*inputs, remote=remote, **kwargs)

    def _px_check_inputs(self, inputs: tuple, kwargs: dict) -> None:
        raise NotImplementedError

    def dispatch(self) -> None:
        """Load the real weights (first local trace) and re-read the configs from them."""
        was = self.dispatched
        super().dispatch()
        if not was:
            self._px_bind(self._module, self._px_adapter)

    def _remoteable_model_key(self) -> str:
        return model_key(self).split(":", 1)[1]

    # ------------------------------------------------------------------ weights, from the server
    def fetch_parameters(self, names: list[str]) -> dict[str, Tensor]:
        """The parameters `names` (dotted paths in the module) as the server holds them, saved
        from one trace on a blank image (the body is plain code: it runs without prisma-ext)."""
        from nnsight import save

        args, kwargs = self._px_probe()
        module = self._module
        with lock_of(module), eval_mode(module), torch.no_grad():
            with self.trace(*args, **kwargs):
                params = save({})
                for name in names:
                    params[name] = self._module.get_parameter(name).detach()
        return params

    def _px_probe(self) -> tuple[tuple, dict]:
        """The inputs of the smallest trace: one blank image."""
        cfg = self.cfg
        return (torch.zeros(1, cfg.in_chans, *cfg.img_size),), {}

    def _px_server_value(self, tensor: Tensor | None) -> Tensor | None:
        """`tensor` (a parameter of the module: meta here) as the server holds it, fetched once."""
        if tensor is None or not tensor.is_meta:
            return tensor
        name = next(n for n, p in self._module.named_parameters() if p is tensor)
        cache = self.__dict__.setdefault("_px_server_values", {})
        if name not in cache:
            cache[name] = self.fetch_parameters([name])[name]
        return cache[name]


class RemoteTracedCLIP(_RemoteClient, RemoteSitesHF, TracedCLIP):
    """A Hugging Face CLIP checkpoint (repo id or saved folder) traced remotely, keyed as nnsight's
    `HuggingFaceModel`; `TracedCLIP`'s site names.

    `remote` is the default for `trace(...)`: False (local), True (NDIF, API key from nnsight's
    config: `nnsight.CONFIG.set_default_api_key(...)` or `NDIF_API_KEY`) or "local" (simulated
    round trip); `trace(..., remote=...)` overrides it per trace.
    """

    AUTO_CLASS = "AutoModel"  # CLIPConfig -> CLIPModel, CLIPVisionConfig -> CLIPVisionModel
    KINDS = "CLIPModel and CLIPVisionModel checkpoints"

    def _px_build(self, repo_id: str, *args: Any, revision: str | None, **kwargs: Any) -> None:
        HuggingFaceModel.__init__(self, repo_id, *args, revision=revision, **kwargs)

    def _px_adapter_class(self) -> type:
        from ..adapters.hf_clip import HFCLIPAdapter

        return HFCLIPAdapter

    def _px_input_names(self) -> tuple[str | None, str | None]:
        return self._px_inputs.image, self._px_inputs.text

    def _px_check_inputs(self, inputs: tuple, kwargs: dict) -> None:
        TracedCLIP._batch_size(self, *inputs, **kwargs)

    def _px_probe(self) -> tuple[tuple, dict]:
        cfg = self.cfg
        return (), {"fn": self.encoder("visual"), **self.tower_inputs("visual", torch.zeros(1, cfg.in_chans,
                                                                                           *cfg.img_size))}

    @property
    def logit_scale(self) -> Tensor:
        """The checkpoint's logit scale, saved from the server (one trace, then kept)."""
        self._px_live()
        return self._px_server_value(self._px_adapter.logit_scale(self._module)).reshape(())

    @property
    def logit_bias(self) -> Tensor | None:
        self._px_live()
        bias = self._px_server_value(self._px_adapter.logit_bias(self._module))
        return None if bias is None else bias.reshape(())


class RemoteTracedViT(_RemoteClient, RemoteSitesTransformers, TracedViT):
    """A Hugging Face `ViTForImageClassification` checkpoint (repo id or saved folder) traced
    remotely, keyed as nnsight's `TransformersModel` with task "image-classification";
    HookedViT's site names. Otherwise as `RemoteTracedCLIP`."""

    KINDS = "ViTForImageClassification checkpoints"
    ARCHITECTURES = ("ViTForImageClassification",)
    TASK = "image-classification"  # its pipeline builds ViTConfig -> ViTForImageClassification

    def _px_build(self, repo_id: str, *args: Any, revision: str | None, **kwargs: Any) -> None:
        TransformersModel.__init__(self, repo_id, *args, revision=revision, task=self.TASK,
                                   image_processor=_image_processor(repo_id, revision), **kwargs)

    def _px_adapter_class(self) -> type:
        from ..adapters.hf_vit import HFViTAdapter

        return HFViTAdapter

    def _px_input_names(self) -> tuple[str | None, str | None]:
        params = inspect.signature(type(self._module).forward).parameters
        return next((n for n in ("pixel_values", "images", "x") if n in params), None), None

    def _px_check_inputs(self, inputs: tuple, kwargs: dict) -> None:
        TracedViT._batch_size(self, *inputs, **kwargs)


def _image_processor(repo_id: str, revision: str | None) -> Any:
    """The checkpoint's image processor, or ViT's default where it publishes none. nnsight's
    pipeline build needs one (transformers 5's pipelines no longer say which they load); the
    traces themselves take pixel tensors and never use it."""
    from transformers import AutoImageProcessor, ViTImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(repo_id, revision=revision)
    except (OSError, ValueError):
        return ViTImageProcessor()


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


def check_api_key() -> None:
    """Before a request goes to NDIF: PrismaError when no API key is set (none in nnsight's
    config, which also reads NDIF_API_KEY), saying how to set one; nnsight itself would send the
    request without one and the server would refuse it."""
    from nnsight import CONFIG

    if CONFIG.API.APIKEY or os.environ.get("NDIF_API_KEY"):
        return
    raise PrismaError(
        "no NDIF API key is set, so the server would refuse this request: set one with "
        "nnsight.CONFIG.set_default_api_key('<key>') (saved in nnsight's config.yaml), nnsight.ndif.login(), "
        "or the NDIF_API_KEY environment variable (a key comes from your NDIF account); remote='local' "
        "simulates the round trip here without one")
