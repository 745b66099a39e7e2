"""The lineage that decides which source parameters a remote model's analysis downloads, and the
partial conversion built from them (`prisma_ext.analysis.remote_weights`)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prisma_ext.analysis.remote_weights import MetaWins, SourceLineage, Unfetched, lineage, partial_conversion
from prisma_ext.errors import PrismaError


class Source(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3, bias=False)


class Target(nn.Module):
    def __init__(self):
        super().__init__()
        self.folded, self.plain, self.missing = (nn.Parameter(torch.empty(3, 3)) for _ in range(3))
        self.zeros = nn.Parameter(torch.empty(3))


def convert(source: nn.Module) -> nn.Module:
    """A conversion with the shapes of the real one: a fold done in place, a bias folded from
    another layer through __setitem__, a copy_ into the target, a constant from a shape."""
    folded = source.a.weight.detach().clone()
    folded += source.b.weight.T  # in place: keeps a's lineage and adds b's
    plain = source.c.weight * 2
    missing = torch.zeros_like(plain)
    missing[0] = source.b.bias  # __setitem__ writes b.bias into it
    with torch.device("meta"):
        target = Target()
    with torch.no_grad():
        target.folded.copy_(folded)
        target.plain.copy_(plain)
        target.missing.copy_(missing)
        target.zeros.copy_(torch.zeros_like(target.zeros))
    return target


def test_lineage_follows_in_place_ops_and_writes():
    source = Source().to("meta")
    found = lineage(convert, source)
    assert found == {"folded": {"a.weight", "b.weight"}, "plain": {"c.weight"}, "missing": {"b.bias"},
                     "zeros": frozenset()}


def test_partial_conversion_is_exact_where_every_source_is_fetched():
    real = Source()
    full = convert_real(real)
    fetched = {n: real.get_parameter(n).detach() for n in ("a.weight", "b.weight", "c.weight")}
    built = partial_conversion(convert, copy.deepcopy(real).to("meta"), fetched)
    torch.testing.assert_close(built.folded, full["folded"], atol=0, rtol=0)
    torch.testing.assert_close(built.plain, full["plain"], atol=0, rtol=0)
    assert torch.equal(built.zeros, torch.zeros(3))  # a constant: real without any source
    assert isinstance(built.missing, Unfetched)  # b.bias was not fetched
    with pytest.raises(PrismaError, match=r"missing \[3, 3\] is not downloaded"):
        built.missing.sum()
    with pytest.raises(PrismaError, match="missing"):
        torch.matmul(torch.ones(3, 3), built.missing)


def convert_real(source: nn.Module) -> dict[str, torch.Tensor]:
    """The same conversion on real weights, with nothing meta (the reference)."""
    folded = source.a.weight.detach().clone()
    folded += source.b.weight.T
    missing = torch.zeros(3, 3)
    missing[0] = source.b.bias.detach()
    return {"folded": folded, "plain": source.c.weight.detach() * 2, "missing": missing}


def test_modes_leave_no_mode_behind():
    with SourceLineage():
        pass
    with MetaWins():
        pass
    assert torch.ones(2).device.type == "cpu" and (torch.ones(2) + 1).sum() == 4
