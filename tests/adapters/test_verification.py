"""`px.load` checks every conversion against the source's own forward: a user's adapter written
wrong fails at load, naming the first block that diverges; the nnsight backend reads every mapped
site once and compares it; the check leaves no state behind."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import prisma_ext as px
from prisma_ext.adapters import register_adapter, unregister_adapter
from prisma_ext.verification import VerificationError, eval_mode, read_sites
from tests.adapters.test_adapters import TinyViT, TinyViTAdapter, TinyViTWithSites
from tests.support.models import randomize_, small_timm


class ScaledBlock(nn.Module):
    """A block whose attention is scaled by d_model ** -0.5 (seen on a real checkpoint)."""

    def __init__(self, block: nn.Module, d_model: int):
        super().__init__()
        self.inner, self.d_model = block, d_model

    def forward(self, x):
        b, n, d = x.shape
        blk = self.inner
        h = blk.pre_attn(x)
        q, k, v = (f(h).view(b, n, blk.heads, -1).transpose(1, 2) for f in (blk.q, blk.k, blk.v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(self.d_model)).softmax(-1)
        x = x + blk.out((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + blk.ff(blk.pre_ff(x))


def scaled_tiny(seed: int = 2) -> TinyViT:
    model = randomize_(TinyViT().eval(), seed=seed)
    block = model.layers[1]
    model.layers[1] = ScaledBlock(block, model.cls.shape[0])
    # the adapters read the inner block's weights under the same names
    for name in ("pre_attn", "pre_ff", "q", "k", "v", "out", "ff"):
        setattr(model.layers[1], name, getattr(block, name))
    model.layers[1].heads = block.heads
    return model


def test_a_wrong_attention_scale_fails_at_load_naming_the_block():
    src = scaled_tiny()
    adapter = register_adapter(TinyViTWithSites())
    try:
        with pytest.raises(VerificationError, match=r"blocks\.1\.hook_resid_post.*blocks\.0\.hook_resid_post match"):
            px.load(src)
        hooked = px.load(src, verify=False)  # the check skipped: the numbers are wrong, as the error said
        with torch.no_grad():
            x = torch.randn(2, 3, 16, 16)
            assert (hooked(x) - src(x)).abs().max() > 1e-3
    finally:
        unregister_adapter(adapter.name)


def test_without_a_site_map_the_error_says_how_to_see_the_block():
    src = scaled_tiny()
    register_adapter(TinyViTAdapter)
    try:
        with pytest.raises(VerificationError, match="add `site_map` to see which block"):
            px.load(src)
    finally:
        unregister_adapter("tiny-vit")


def test_a_head_left_out_fails_at_load():
    class NoHead(TinyViTAdapter):
        name = "no-head"

        def config(self, m):
            return super().config(m).replace(n_classes=0)

        def weights(self, m):
            weights = super().weights(m)
            weights.head_w = weights.head_b = None
            return weights

    register_adapter(NoHead)
    try:
        shapes = r"has shape \(2, 24\) where the source's own forward gives \(2, 5\)"
        with pytest.raises(VerificationError, match=shapes):
            px.load(randomize_(TinyViT().eval(), seed=1))
    finally:
        unregister_adapter("no-head")


def test_the_nnsight_backend_reads_every_site_and_compares_it():
    class WrongAttnOut(TinyViTWithSites):
        name = "wrong-attn-out"

        def site_map(self, m):
            from prisma_ext.sitemaps import Site

            sites = super().site_map(m)
            sites["blocks.0.hook_attn_out"] = Site("layers.0.pre_ff", "input")  # the residual stream, not the write
            return sites

    adapter = register_adapter(WrongAttnOut())
    try:
        with pytest.raises(VerificationError, match=r"site blocks\.0\.hook_attn_out"):
            px.load(randomize_(TinyViT().eval(), seed=1), backend="nnsight")
    finally:
        unregister_adapter(adapter.name)


def test_loading_leaves_no_state_behind():
    src = small_timm("plain")
    src.train()
    src.blocks[0].eval()  # a mixed mode, restored as it was
    modes = [m.training for m in src.modules()]
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    px.load(src)
    px.load(src, backend="nnsight")
    assert torch.equal(torch.rand(3), expected)  # the global RNG is untouched
    assert [m.training for m in src.modules()] == modes
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in src.modules())


def test_a_source_whose_own_forward_fails_is_named():
    class Failing(TinyViTAdapter):
        name = "failing"

        def reference_output(self, module, images):
            raise RuntimeError("the source cannot run")

    register_adapter(Failing)
    try:
        with pytest.raises(VerificationError, match="source's own forward fails.*cannot run.*verify=False"):
            px.load(TinyViT().eval())
        assert px.load(TinyViT().eval(), verify=False) is not None
    finally:
        unregister_adapter("failing")


def test_helpers_restore_modes_and_remove_hooks():
    src = small_timm("plain").train()
    with eval_mode(src):
        assert not any(m.training for m in src.modules())
    assert all(m.training for m in src.modules())
    from prisma_ext.sitemaps import Site

    values = read_sites(src, {"b0": Site("blocks.0", "input"), "b1": Site("blocks.1")},
                        lambda: src.eval()(torch.randn(1, 3, 32, 32)))
    assert list(values) == ["b0", "b1"] and values["b1"].shape == (1, 17, 48)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in src.modules())
