"""`builtin:NAME`: a model of `prisma_ext.zoo` (shipped weights, offline)."""

from __future__ import annotations

from torch import nn

from ..errors import PrismaError
from . import Source


class BuiltinSource(Source):
    prefix = "builtin"

    def build(self, name, pretrained, kwargs) -> nn.Module:
        from ..zoo import build

        if kwargs:
            raise PrismaError(f"builtin:{name} takes no constructor arguments, got {sorted(kwargs)}")
        return build(name, pretrained)


SOURCE = BuiltinSource()
