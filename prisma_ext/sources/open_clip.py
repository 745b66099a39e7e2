"""`open_clip:ARCH[/TAG]`: open_clip's model factory; local checkpoints by path."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import PrismaError, UnknownNameError, suggest
from . import Source, is_path


class OpenCLIPSource(Source):
    prefix = "open_clip"

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
        try:
            module = open_clip.create_model(arch, pretrained=weights, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            if weights and not is_path(pretrained):
                raise PrismaError(
                    f"could not fetch pretrained weights {weights!r} for open_clip:{arch} ({type(err).__name__}: "
                    f"{err}). Offline? Pass pretrained=False or pretrained='path/to/checkpoint'") from err
            raise PrismaError(f"open_clip could not build {name}: {err}") from err
        module.eval()
        module._prisma_arch = arch
        module._prisma_source = f"open_clip:{arch}" + (f"/{weights}" if weights and not is_path(pretrained) else "")
        return module


SOURCE = OpenCLIPSource()
