"""The adapter contract: what prisma-ext needs to know about a source model, in one place.

An adapter is the only code that knows a source library's module and parameter names. It
recognises a module (`matches`), says why a relative it knows is refused (`refusal`) or which
feature of a variant it cannot convert (`check`), describes the architecture (`config`), hands
over the weights in canonical form (`weights`), names the classes (`class_names`) and says where
each TL site lives for the nnsight backend (`site_map`). `to_hooked` is a template: it always
runs `check`, then `convert`; a subclass overrides `convert` (or nothing), never `to_hooked`.
`CLIPAdapter` adds the text tower and the contrastive head. docs/adapters.md walks through one.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..errors import UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from ..hooked.config import TextConfig, ViTConfig
    from ..hooked.tokenize import PromptTokenizer
    from ..hooked.weights import TextWeights, ViTWeights
    from ..sitemaps.spec import Site


class Adapter:
    """Base class of every adapter; see the module docstring for the contract.

    Required: `name`, `matches`, `config`, `weights`. Optional: `refusal`, `check`, `class_names`,
    `site_map` (without it only the TL backend takes the model), `traced_class` (a
    `prisma_ext.traced.TracedModel` subclass for inputs that are not image tensors, or its
    "module:Class" path so that the adapter need not import nnsight; None: the nnsight backend
    picks `TracedViT` or, for `is_clip` models, `TracedCLIP`).
    """

    name: str = "adapter"
    traced_class: type | str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "to_hooked" in cls.__dict__:
            warnings.warn(f"{cls.__name__} overrides Adapter.to_hooked, which skips the checks it runs: "
                          "override convert(module, options) instead (to_hooked calls check, then convert)",
                          DeprecationWarning, stacklevel=2)

    # ------------------------------------------------------------------ recognising
    def matches(self, module: nn.Module) -> bool:
        """Whether this adapter converts `module` (cheap: no heavy imports)."""
        raise NotImplementedError

    def refusal(self, module: nn.Module) -> str | None:
        """Why `module`, a relative this adapter knows but does not convert (another class of the
        same library), is refused, naming the feature; None when it is not such a relative."""
        return None

    def check(self, module: nn.Module) -> None:
        """Raise `UnsupportedModelError` naming the feature if `module` uses one the hooked model
        lacks. Runs before every conversion (and, through `check_traced`, before every trace)."""

    def check_traced(self, module: nn.Module) -> None:
        """What the nnsight backend needs (it runs the source's own forward and only reads sites,
        so it may take more than the conversion does): by default the same as `check`."""
        self.check(module)

    # ------------------------------------------------------------------ describing
    def config(self, module: nn.Module) -> ViTConfig:
        """The architecture of the (image) tower: widths, token layout, norms, pooling, head."""
        raise NotImplementedError

    def weights(self, module: nn.Module) -> ViTWeights:
        """The (image) tower's parameters in canonical form (`prisma_ext.hooked.weights`)."""
        raise NotImplementedError

    def class_names(self, module: nn.Module) -> list[str] | None:
        return None

    def is_clip(self, module: nn.Module) -> bool:
        """Whether `module` has a text tower too (it becomes a HookedCLIP / TracedCLIP)."""
        return False

    def output_tensor(self, output) -> Tensor:
        """The tensor a forward's `output` stands for (what the analysis layer reads on the nnsight
        backend): the output itself, or a Hugging Face output's `logits`, `image_embeds` or
        `pooler_output`."""
        if isinstance(output, Tensor):
            return output
        for name in ("logits", "image_embeds", "pooler_output"):
            value = getattr(output, name, None)
            if value is not None:
                return value
        return output

    def reference_output(self, module: nn.Module, images: Tensor) -> Tensor:
        """The source's own forward on `images` [batch, C, H, W]: the tensor the converted model's
        `forward(images)` must equal (`px.load` checks it). Default: `module(images)`."""
        return module(images)

    def site_map(self, module: nn.Module) -> dict[str, Site]:
        """TL site name -> `prisma_ext.sitemaps.Site`, in forward order, for the nnsight backend
        (write it with `prisma_ext.sitemaps.SiteMap`). The default refuses."""
        raise UnsupportedModelError(
            f"adapter {self.name!r} has no site map, so the nnsight backend cannot trace "
            f"{type(module).__name__}; the TL backend (backend='tl') can")

    # ------------------------------------------------------------------ converting
    def to_hooked(self, module: nn.Module, **options: Any):
        """The hooked model of `module`: `check`, then `convert`. `options` are config fields
        (fold_ln, use_attn_result, device, dtype, ...)."""
        self.check(module)
        return self.convert(module, options)

    def convert(self, module: nn.Module, options: dict[str, Any]):
        """Build the hooked model (`check` has passed): a HookedViT from `config` and `weights`."""
        from ..hooked.vit import HookedViT

        cfg = self.config(module).replace(**options)
        return HookedViT.from_weights(cfg, self.weights(module), self.class_names(module))


class CLIPAdapter(Adapter):
    """An adapter of CLIP-like models: an image tower (`config`, `weights`), a text tower
    (`text_config`, `text_weights`, `tokenizer`) and the contrastive head (`logit_scale`,
    `logit_bias`). `convert` builds a HookedCLIP (a HookedViT where `is_clip` is False, e.g. a
    vision tower on its own)."""

    def is_clip(self, module: nn.Module) -> bool:
        return True

    def check_vision(self, module: nn.Module) -> None:
        """`check` for the image tower alone (a model whose text tower only the nnsight backend
        takes still has its image tower verified against a conversion); by default `check`."""
        self.check(module)

    def to_hooked_vision(self, module: nn.Module):
        """The image tower alone as a HookedViT (`check_vision`, then the plain conversion)."""
        self.check_vision(module)
        return Adapter.convert(self, module, {})

    def text_config(self, module: nn.Module) -> TextConfig:
        raise NotImplementedError

    def text_weights(self, module: nn.Module) -> TextWeights:
        raise NotImplementedError

    def tokenizer(self, module: nn.Module) -> PromptTokenizer | Any | None:
        """A `PromptTokenizer`, a zero-argument factory of one (built on first use), or None
        (then prompts must be given as token ids)."""
        return None

    def reference_image_embed(self, module: nn.Module, images: Tensor) -> Tensor:
        """The source's own image embedding [batch, d_proj] (what `HookedCLIP.encode_image` must equal)."""
        raise NotImplementedError(f"{type(self).__name__}.reference_image_embed: say how the source embeds "
                                  "images, so px.load can check the conversion")

    def reference_text_embed(self, module: nn.Module, tokens: Tensor) -> Tensor:
        """The source's own text embedding [batch, d_proj] of token ids (what `encode_text` must equal)."""
        raise NotImplementedError(f"{type(self).__name__}.reference_text_embed: say how the source embeds "
                                  "text, so px.load can check the conversion")

    def logit_scale(self, module: nn.Module) -> Tensor:
        """log of the temperature CLIP multiplies cosine similarities by (a scalar)."""
        raise NotImplementedError

    def logit_bias(self, module: nn.Module) -> Tensor | None:
        """The bias added to every logit (SigLIP), or None."""
        return None

    def convert(self, module: nn.Module, options: dict[str, Any]):
        if not self.is_clip(module):
            return super().convert(module, options)
        from ..hooked.clip import HookedCLIP
        from ..hooked.text import HookedTextTransformer
        from ..hooked.vit import HookedViT

        vcfg = self.config(module).replace(**options)
        tcfg = self.text_config(module).replace(**options)
        visual = HookedViT.from_weights(vcfg, self.weights(module))
        text = HookedTextTransformer.from_weights(tcfg, self.text_weights(module))
        bias = self.logit_bias(module)
        clip = HookedCLIP(visual, text, self.logit_scale(module).detach().to(vcfg.dtype),
                          bias.detach().to(vcfg.dtype) if bias is not None else None,
                          tokenizer=self.tokenizer(module), source=vcfg.source)
        return clip.to(device=vcfg.device).eval()


def conv_patch_weight(weight: Tensor, patch_size: int | tuple[int, int], in_chans: int,
                      pixel_order: str = "(p1 p2 c)") -> Tensor:
    """A Linear patch embedding's weight [d_model, ph * pw * in_chans] as the Conv2d weight
    [d_model, in_chans, ph, pw] that `ViTWeights.patch_w` takes.

    `pixel_order` says how the Linear layer's input flattens a patch: "(p1 p2 c)" (rows, then
    columns, then channels fastest: einops' `b c (h p1) (w p2) -> b (h w) (p1 p2 c)`, as in
    lucidrains' vit-pytorch) or "(c p1 p2)" (channels slowest: a flattened convolution's order).
    The bias is the Linear layer's bias as it is.
    """
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    d_model, n_in = weight.shape
    if n_in != ph * pw * in_chans:
        raise UnsupportedModelError(f"conv_patch_weight: the Linear layer reads {n_in} values, but a {ph}x{pw} "
                                    f"patch of {in_chans} channels has {ph * pw * in_chans}")
    if pixel_order == "(p1 p2 c)":
        return weight.reshape(d_model, ph, pw, in_chans).permute(0, 3, 1, 2).contiguous()
    if pixel_order == "(c p1 p2)":
        return weight.reshape(d_model, in_chans, ph, pw).contiguous()
    raise UnsupportedModelError(f"conv_patch_weight: pixel_order must be '(p1 p2 c)' or '(c p1 p2)', got "
                                f"{pixel_order!r}")


def norm_params(norm: nn.Module) -> tuple | None:
    """(weight, bias) of a LayerNorm or RMSNorm (ones and zeros where it has none), None for an
    identity."""
    if isinstance(norm, nn.Identity):
        return None
    import torch

    w = getattr(norm, "weight", None)
    if w is None:
        w = torch.ones(norm.normalized_shape, dtype=torch.get_default_dtype())
    b = getattr(norm, "bias", None)
    return w, (b if b is not None else torch.zeros_like(w))
