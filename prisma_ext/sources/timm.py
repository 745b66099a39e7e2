"""`timm:NAME[.TAG]`: timm's model factory, with its own checkpoint filter for local files."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import PrismaError, UnknownNameError, UnsupportedModelError, closest, suggest
from . import Source, is_path
from .hub import failure_reason, offline_if_unreachable

EXAMPLES = ["vit_small_patch16_224", "deit_small_distilled_patch16_224", "vit_small_patch14_reg4_dinov2",
            "vit_base_patch16_siglip_224"]


def supported_timm_names() -> list[str]:
    """timm model names built by the classes the timm adapters convert (timm's vision_transformer,
    deit and eva modules); a config there that uses a refused feature (post-norm blocks,
    grouped-query attention ...) is still refused, with the feature named, when it is loaded."""
    import timm

    return timm.list_models(module=["vision_transformer", "deit", "eva"])


class TimmSource(Source):
    prefix = "timm"

    def closest_supported(self, name: str, n: int = 3) -> list[str]:
        import timm

        from . import accepted

        arch = name.split(".")[0]
        candidates = [c for c in closest(arch, supported_timm_names(), n=12) if c != arch]
        return accepted(lambda c: timm.create_model(c, pretrained=False),
                        candidates + [c for c in EXAMPLES if c not in candidates], n)

    def build(self, name, pretrained, kwargs) -> nn.Module:
        import timm

        arch = name.split(".")[0]
        if not timm.is_model(arch):
            raise UnknownNameError(suggest(arch, supported_timm_names(), "timm model") +
                                   "; timm.list_models() lists every name")
        if is_path(pretrained):
            path = Path(pretrained)
            if not path.is_file():
                raise PrismaError(f"pretrained checkpoint {str(path)!r} does not exist")
            overlay = dict(file=str(path))
            if "num_classes" in kwargs:  # else timm drops a head whose size differs from its default
                overlay["num_classes"] = kwargs["num_classes"]
            kwargs = dict(kwargs, pretrained_cfg_overlay=overlay)
            pretrained = True
        from_hub = bool(pretrained) and not kwargs.get("pretrained_cfg_overlay")
        try:
            with offline_if_unreachable(from_hub) as unreachable:
                module = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            if from_hub:
                why = failure_reason(err, unreachable, "the file")
                raise PrismaError(
                    f"could not fetch pretrained weights for timm:{name} ({why}). "
                    "Offline? Pass pretrained=False for random weights or pretrained='path/to/checkpoint'"
                ) from err
            raise PrismaError(f"timm could not build {name}: {err}") from err
        module.eval()
        from ..adapters.timm_eva import TimmEvaAdapter
        from ..adapters.timm_vit import TimmViTAdapter

        adapters = (TimmViTAdapter(), TimmEvaAdapter())
        if not any(adapter.matches(module) for adapter in adapters):
            reason = adapters[0].refusal(module) or f"{type(module).__name__} is not a ViT"
            near = self.closest_supported(name)
            raise UnsupportedModelError(f"timm:{name}: {reason}; closest supported names: {', '.join(near)}")
        return module


SOURCE = TimmSource()
