"""`open_clip:ARCH[/TAG]`: open_clip's model factory; local checkpoints by path."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import PrismaError, UnknownNameError, suggest
from . import Source, is_path
from .hub import failure_reason, offline_if_unreachable


class OpenCLIPSource(Source):
    prefix = "open_clip"

    def closest_supported(self, name: str, n: int = 3) -> list[str]:
        import open_clip
        from open_clip.factory import get_model_config

        from ..errors import closest
        from . import accepted

        own_text = [c for c in open_clip.list_models()  # a Hugging Face text tower would be fetched
                    if not (get_model_config(c) or {}).get("text_cfg", {}).get("hf_model_name")]
        candidates = [c for c in closest(name, own_text, n=12) if c != name]
        return accepted(_meta_model, candidates + [c for c in EXAMPLES if c not in candidates], n)


    def build(self, name, pretrained, kwargs) -> nn.Module:
        import open_clip

        arch, _, tag = name.partition("/")
        if arch not in open_clip.list_models():
            raise UnknownNameError(suggest(arch, open_clip.list_models(), "open_clip model") +
                                   "; open_clip.list_models() lists every name")
        if is_path(pretrained):
            if not Path(pretrained).is_file():
                raise PrismaError(f"pretrained checkpoint {str(pretrained)!r} does not exist")
            weights = str(pretrained)
        elif pretrained:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            if tag and tag not in tags:
                raise UnknownNameError(suggest(tag, tags, f"pretrained tag of {arch}"))
            if not tag and not tags:
                raise PrismaError(f"open_clip:{arch} has no published weights; pass pretrained=False")
            weights = tag or tags[0]
        else:
            weights = None
        from_hub = bool(weights) and not is_path(pretrained)
        try:
            with offline_if_unreachable(from_hub) as unreachable:
                module = open_clip.create_model(arch, pretrained=weights, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            if from_hub:
                why = failure_reason(err, unreachable, "the file")
                raise PrismaError(
                    f"could not fetch pretrained weights {weights!r} for open_clip:{arch} ({why}). "
                    "Offline? Pass pretrained=False or pretrained='path/to/checkpoint'") from err
            raise PrismaError(f"open_clip could not build {name}: {err}") from err
        module.eval()
        module._prisma_arch = arch
        module._prisma_source = f"open_clip:{arch}" + (f"/{weights}" if weights and not is_path(pretrained) else "")
        return module


EXAMPLES = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-16-SigLIP2", "EVA02-B-16"]


def _meta_model(arch: str) -> nn.Module:
    """open_clip's model of `arch` built from its config without weights (the current device)."""
    import copy

    from open_clip.coca_model import CoCa
    from open_clip.factory import get_model_config
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(get_model_config(arch))
    custom = cfg.pop("custom_text", False)
    cls = CoCa if "multimodal_cfg" in cfg else (CustomTextCLIP if custom else CLIP)
    return cls(**cfg).eval()


SOURCE = OpenCLIPSource()
