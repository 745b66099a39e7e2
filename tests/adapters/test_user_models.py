"""The adapter contract covers what real user models do (seen on a third-party checkpoint):
attention scaled by d_model ** -0.5, a Linear-GELU-Linear classifier head, a Linear patch
embedding over (p1 p2 c)-flattened pixels. The adapter below is the worked example of
docs/adapters.md; it reproduces its module and px.load's check passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prisma_ext as px
from prisma_ext.adapters import Adapter, conv_patch_weight, register_adapter, unregister_adapter
from prisma_ext.errors import PrismaError, UnsupportedModelError
from tests.support.models import randomize_


class Patches(nn.Module):
    """b c (h p1) (w p2) -> b (h w) (p1 p2 c), then a Linear layer (lucidrains-style)."""

    def __init__(self, patch: int, chans: int, d: int):
        super().__init__()
        self.patch = patch
        self.linear = nn.Linear(patch * patch * chans, d)

    def forward(self, x):
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # b h w p1 p2 c
        return self.linear(x.reshape(b, (h // p) * (w // p), p * p * c))


class UserBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.d = heads, d
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1)  # d_model, not d_head: the checkpoint's choice
        x = x + self.out((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class UserViT(nn.Module):
    def __init__(self, d=24, heads=3, layers=2, patch=4, img=16, chans=3, classes=5):
        super().__init__()
        self.patches = Patches(patch, chans, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, 1 + (img // patch) ** 2, d))
        self.blocks = nn.ModuleList(UserBlock(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, classes))
        self.img, self.patch, self.chans = img, patch, chans

    def forward(self, x):
        x = self.patches(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


class UserViTAdapter(Adapter):
    name = "user-vit"

    def matches(self, module):
        return isinstance(module, UserViT)

    def config(self, m):
        d, blk = m.cls.shape[-1], m.blocks[0]
        return px.ViTConfig(d_model=d, n_layers=len(m.blocks), n_heads=blk.heads, d_head=d // blk.heads,
                            d_mlp=blk.mlp[0].out_features, n_classes=m.head[-1].out_features,
                            head_type="module", attn_scale=d ** -0.5, in_chans=m.chans,
                            img_size=(m.img, m.img), patch_size=(m.patch, m.patch), eps=1e-5, eps_final=1e-5,
                            mean=(0.5,), std=(0.5,), source="user-vit")

    def weights(self, m):
        ln = lambda n: (n.weight, n.bias)  # noqa: E731
        blocks = [px.BlockWeights(ln1=ln(b.norm1), ln2=ln(b.norm2), qkv_w=b.qkv.weight, qkv_b=b.qkv.bias,
                                  proj_w=b.out.weight, proj_b=b.out.bias, fc1_w=b.mlp[0].weight, fc1_b=b.mlp[0].bias,
                                  fc2_w=b.mlp[2].weight, fc2_b=b.mlp[2].bias) for b in m.blocks]
        patch_w = conv_patch_weight(m.patches.linear.weight, m.patch, m.chans, pixel_order="(p1 p2 c)")
        return px.ViTWeights(patch_w=patch_w, patch_b=m.patches.linear.bias, cls=m.cls.reshape(-1), dist=None,
                             reg=None, pos_embed=m.pos[0], ln_pre=None, blocks=blocks, ln_final=ln(m.norm),
                             head_w=None, head_b=None, head_module=m.head)


@pytest.fixture
def user_vit():
    adapter = register_adapter(UserViTAdapter())
    yield randomize_(UserViT().eval(), seed=3)
    unregister_adapter(adapter.name)


def test_the_user_model_reproduces_with_every_option(user_vit):
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = user_vit(x)
        for options in ({}, dict(fold_ln=True), dict(center_writing_weights=True), dict(fold_value_biases=True)):
            torch.testing.assert_close(px.load(user_vit, **options)(x), want, atol=1e-4, rtol=1e-4)
    model = px.load(user_vit)
    assert model.cfg.attn_scale == pytest.approx(24 ** -0.5)
    assert model.head is not user_vit.head  # a copy: the source keeps its own
    # the logit lens reads through the whole head, and its last layer is the model's output
    lens = px.logit_lens(model, x)
    torch.testing.assert_close(lens.part("pooled").values[:, -1], want, atol=1e-4, rtol=1e-4)
    # methods that need a linear head say so
    with pytest.raises(PrismaError, match="needs a linear head.*Sequential"):
        px.direct_logit_attribution(model, x)
    with pytest.raises(PrismaError, match="needs a linear head"):
        model.W_U  # noqa: B018
    sweep = px.activation_patching(model, x[:1], x[1:2], px.LogitDiff(0, 1), sites="resid_pre", progress=False)
    assert sweep["resid_pre"].values.shape == (1, 2, 17)
    # and the explicit-softmax path (a pattern hook) uses the same scale
    _, cache = model.run_with_cache(x)
    assert cache["blocks.0.attn.hook_pattern"].shape == (3, 3, 17, 17)


def test_the_attention_scale_is_checked_at_load(user_vit):
    class DefaultScale(UserViTAdapter):
        name = "default-scale"

        def config(self, m):
            return super().config(m).replace(attn_scale=None)

    register_adapter(DefaultScale())
    try:
        with pytest.raises(PrismaError, match="its output differs from the source.s own forward"):
            px.load(user_vit)
    finally:
        unregister_adapter("default-scale")


def test_conv_patch_weight_orders():
    linear = torch.randn(8, 2 * 2 * 3)
    conv = conv_patch_weight(linear, 2, 3)
    patch = torch.randn(3, 2, 2)  # c p1 p2
    flat = patch.permute(1, 2, 0).reshape(-1)  # (p1 p2 c)
    torch.testing.assert_close(conv.reshape(8, -1) @ patch.reshape(-1), linear @ flat)
    assert torch.equal(conv_patch_weight(linear, 2, 3, pixel_order="(c p1 p2)").reshape(8, -1), linear)
    with pytest.raises(UnsupportedModelError, match="reads 12 values"):
        conv_patch_weight(linear, 4, 3)
    with pytest.raises(UnsupportedModelError, match="pixel_order"):
        conv_patch_weight(linear, 2, 3, pixel_order="(p2 p1 c)")


def test_mean_and_std_must_fit_the_channels():
    cfg = dict(d_model=8, n_layers=1, n_heads=2, d_head=4, d_mlp=8)
    assert px.ViTConfig(**cfg, in_chans=1, mean=(0.5,), std=(0.2,)).mean == (0.5,)
    assert px.ViTConfig(**cfg, in_chans=4, mean=(0.5,), std=(0.2,)).std == (0.2,) * 4
    with pytest.raises(PrismaError, match="mean has 3 values for 1 input channels"):
        px.ViTConfig(**cfg, in_chans=1, mean=(0.5, 0.5, 0.5))
    import timm

    grey = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=1, img_size=32, depth=1)
    assert len(px.load(grey).cfg.mean) == 1


# ---------------------------------------------------------------- the nnsight side of user models
def inline_attention(module, x):
    """UserBlock's attention step by step, serving the pattern no module sees (a SwapForward body)."""
    from prisma_ext.sitemaps import serve

    b, n, d = x.shape
    blk = module
    q, k, v = blk.qkv(blk.norm1(x)).view(b, n, 3, blk.heads, -1).permute(2, 0, 3, 1, 4)
    pattern = serve(blk, "pattern", (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1))
    x = x + blk.out((pattern @ v).transpose(1, 2).reshape(b, n, d))
    return x + blk.mlp(blk.norm2(x))


class UserViTWithSites(UserViTAdapter):
    name = "user-vit-sites"

    def site_map(self, m):
        from prisma_ext.sitemaps import BlockSites, Site, SiteMap, SwapForward

        sites = SiteMap()
        for i, _ in enumerate(m.blocks):
            p = f"blocks.{i}"
            sites.block(i, BlockSites(
                resid_pre=Site(p, "input"), ln1=Site(f"{p}.norm1"),
                pattern=Site(p, "pattern", shape="[batch, head, query, key]", prepare=SwapForward(p, inline_attention)),
                attn_out=Site(f"{p}.out"), resid_mid=Site(f"{p}.norm2", "input", in_place=True),
                ln2=Site(f"{p}.norm2"), mlp_out=Site(f"{p}.mlp"), resid_post=Site(p)))
        return sites.add("ln_final.hook_normalized", Site("norm")).done()


def test_an_inline_softmax_is_served_to_the_trace_and_editable():
    adapter = register_adapter(UserViTWithSites())
    try:
        src = randomize_(UserViT().eval(), seed=4)
        traced, hooked = px.load(src, backend="nnsight"), px.load(src)  # the check compares every site
    finally:
        unregister_adapter(adapter.name)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    uniform = torch.full((2, 3, 17, 17), 1 / 17)
    with torch.no_grad():
        with traced.trace(x):
            pattern = traced.site("blocks.0.attn.hook_pattern").save()
            traced.set_site("blocks.1.attn.hook_pattern", uniform)
            edited = traced.output.save()
        _, cache = hooked.run_with_cache(x)
        want = hooked.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda v, hook: uniform)])
    torch.testing.assert_close(pattern, cache["blocks.0.attn.hook_pattern"], atol=1e-5, rtol=0)
    torch.testing.assert_close(edited, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(src(x), hooked(x), atol=1e-4, rtol=1e-4)  # the swap is undone after the trace
    rollout = px.attention_rollout(traced, x)
    torch.testing.assert_close(rollout.values, px.attention_rollout(hooked, x).values, atol=1e-5, rtol=0)


def test_a_method_names_the_site_a_map_leaves_out():
    """UserViTWithSites maps no hook_v / hook_z: DLA by source says so, naming the method and the adapter."""
    adapter = register_adapter(UserViTWithSites())
    try:
        traced = px.load(randomize_(UserViT().eval(), seed=4), backend="nnsight")
    finally:
        unregister_adapter(adapter.name)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(PrismaError, match=r"activation_patching: it reads blocks\.0\.attn\.hook_z.*user-vit-sites"):
        px.activation_patching(traced, x[:1], x[1:], 0, sites="z", progress=False)
    with pytest.raises(PrismaError, match=r"gradient_attention: .*does not map.*can map them in its site_map"):
        import unittest.mock

        with unittest.mock.patch.object(type(traced), "site_names", property(lambda self: ["blocks.0.hook_resid_pre"])):
            px.gradient_attention(traced, x)


# ---------------------------------------------------------------- a forward that adds in place
class InPlaceBlock(UserBlock):
    """`out += x`: the attention output's own tensor becomes the residual stream after it is read."""

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1)
        out = self.out((att @ v).transpose(1, 2).reshape(b, n, d))
        out += x
        return out + self.mlp(self.norm2(out))


def in_place_vit(seed: int = 5) -> UserViT:
    model = UserViT()
    for i, blk in enumerate(model.blocks):
        new = InPlaceBlock(blk.d, blk.heads)
        new.load_state_dict(blk.state_dict())
        model.blocks[i] = new
    return randomize_(model.eval(), seed=seed)


def in_place_sites(copy: bool):
    class Sites(UserViTAdapter):
        name = f"in-place-{copy}"

        def site_map(self, m):
            from prisma_ext.sitemaps import BlockSites, Site, SiteMap

            sites = SiteMap()
            for i, _ in enumerate(m.blocks):
                p = f"blocks.{i}"
                sites.block(i, BlockSites(resid_pre=Site(p, "input"), attn_out=Site(f"{p}.out", copy=copy),
                                          resid_mid=Site(f"{p}.norm2", "input", in_place=True),
                                          mlp_out=Site(f"{p}.mlp"), resid_post=Site(p)))
            return sites.done()

    return Sites()


def test_a_site_the_module_changes_in_place_is_caught_or_copied():
    src = in_place_vit()
    adapter = register_adapter(in_place_sites(copy=False))
    try:
        with pytest.raises(PrismaError, match=r"site blocks\.0\.hook_attn_out: the module changed this tensor in "
                                              r"place.*copy=True"):
            px.load(src, backend="nnsight")
        traced = px.load(src, backend="nnsight", verify=False)
        with pytest.raises(PrismaError, match="changed this tensor in place"):
            traced.run_with_cache(torch.randn(2, 3, 16, 16))
    finally:
        unregister_adapter(adapter.name)
    adapter = register_adapter(in_place_sites(copy=True))
    try:
        traced, hooked = px.load(src, backend="nnsight"), px.load(src)  # the check compares every site
    finally:
        unregister_adapter(adapter.name)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, got = traced.run_with_cache(x)
        _, want = hooked.run_with_cache(x)
        with traced.trace(x):  # an edit of the copied site still reaches the output
            traced.site("blocks.1.hook_attn_out")[:] = 0
            zeroed = traced.output.save()
        want_zeroed = hooked.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_attn_out", lambda v, hook: v * 0)])
    torch.testing.assert_close(got["blocks.0.hook_attn_out"], want["blocks.0.hook_attn_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(zeroed, want_zeroed, atol=1e-5, rtol=0)
