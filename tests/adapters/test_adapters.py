"""The adapter registry: a hand-written ViT in a few dozen lines, refusals, px.load's errors."""

import math

import pytest
import torch
from torch import nn

import prisma_ext as px
from prisma_ext.adapters import Adapter, adapter_for, register_adapter, unregister_adapter
from prisma_ext.errors import PrismaError, UnknownNameError, UnsupportedModelError
from tests.support.models import SMALL, images_for, randomize_, small_timm


# ---------------------------------------------------------------- a ViT that is not timm's
class TinyBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.pre_attn, self.pre_ff = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        b, n, d = x.shape
        h = self.pre_attn(x)
        q, k, v = (f(h).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)).softmax(-1)
        x = x + self.out((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.ff(self.pre_ff(x))


class TinyViT(nn.Module):
    def __init__(self, d=24, heads=3, layers=2, patch=4, img=16, classes=5):
        super().__init__()
        self.patch, self.img = patch, img
        self.to_patches = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.zeros(d))
        self.pos = nn.Parameter(torch.zeros(1 + (img // patch) ** 2, d))
        self.layers = nn.ModuleList(TinyBlock(d, heads) for _ in range(layers))
        self.norm, self.classifier = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        x = self.to_patches(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.classifier(self.norm(x)[:, 0])


class TinyViTAdapter(Adapter):
    """The whole adapter for TinyViT: recognise it, describe it, hand over its weights."""

    name = "tiny-vit"

    def matches(self, module):
        return isinstance(module, TinyViT)

    def config(self, m):
        d, blk = m.cls.shape[0], m.layers[0]
        return px.ViTConfig(d_model=d, n_layers=len(m.layers), n_heads=blk.heads, d_head=d // blk.heads,
                            d_mlp=blk.ff[0].out_features, n_classes=m.classifier.out_features,
                            img_size=(m.img, m.img), patch_size=(m.patch, m.patch), eps=1e-5,
                            eps_final=1e-5, source="tiny-vit")

    def weights(self, m):
        ln = lambda n: (n.weight, n.bias)  # noqa: E731
        blocks = [px.BlockWeights(
            ln1=ln(b.pre_attn), ln2=ln(b.pre_ff),
            qkv_w=torch.cat([b.q.weight, b.k.weight, b.v.weight]),
            qkv_b=torch.cat([b.q.bias, b.k.bias, b.v.bias]),
            proj_w=b.out.weight, proj_b=b.out.bias,
            fc1_w=b.ff[0].weight, fc1_b=b.ff[0].bias, fc2_w=b.ff[2].weight, fc2_b=b.ff[2].bias,
        ) for b in m.layers]
        return px.ViTWeights(patch_w=m.to_patches.weight, patch_b=m.to_patches.bias, cls=m.cls, dist=None,
                             reg=None, pos_embed=m.pos, ln_pre=None, blocks=blocks, ln_final=ln(m.norm),
                             head_w=m.classifier.weight, head_b=m.classifier.bias)


@pytest.fixture
def tiny_adapter():
    register_adapter(TinyViTAdapter)
    yield
    unregister_adapter("tiny-vit")


def test_user_adapter_reproduces_hand_written_vit(tiny_adapter):
    src = randomize_(TinyViT().eval(), seed=2)
    x = torch.randn(3, 3, 16, 16)
    hooked = px.load(src)
    assert adapter_for(src).name == "tiny-vit"
    with torch.no_grad():
        ref = src(x)
        logits, cache = hooked.run_with_cache(x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    assert cache["blocks.1.attn.hook_pattern"].shape == (3, 3, 17, 17)
    folded = px.load(src, fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref, atol=1e-4, rtol=0)


def test_unregistered_module_is_refused_with_the_registry():
    with pytest.raises(UnsupportedModelError, match="no adapter recognises .*TinyViT.*timm-vit"):
        px.load(TinyViT())


def test_register_adapter_rejects_non_adapters():
    with pytest.raises(TypeError, match="must subclass"):
        register_adapter(object())


# ---------------------------------------------------------------- refusals and names
@pytest.mark.parametrize("arch, feature", [
    ("beit_base_patch16_224", "relative position bias"),
    ("swin_tiny_patch4_window7_224", "windowed"),
])
def test_other_timm_families_are_refused(arch, feature):
    import timm

    module = timm.create_model(arch, pretrained=False, num_classes=3, depth=1) if "beit" in arch else \
        timm.create_model(arch, pretrained=False, num_classes=3)
    with pytest.raises(UnsupportedModelError, match=feature):
        px.load(module)


def test_named_unsupported_family_lists_close_supported_names():
    from prisma_ext.catalog import parity

    with pytest.raises(UnsupportedModelError, match="relative position bias.*closest supported names: ") as err:
        px.load("timm:beit_base_patch16_224", pretrained=False, depth=1)
    near = str(err.value).split("closest supported names: ")[1].split(", ")
    assert near and all(parity()["timm"][n][1] == "reproduced" for n in near)


@pytest.mark.parametrize("source, kwargs, feature", [
    ("timm:vit_small_patch16_18x2_224", dict(depth=2), "parallel attention and MLP branches"),
    ("open_clip:RN50", {}, "a ResNet visual tower"),
])
def test_a_refused_named_model_suggests_the_closest_names_that_load(source, kwargs, feature):
    """The feature is named, then up to three names of the same source that really load."""
    with pytest.raises(UnsupportedModelError, match=f"{feature}.*; closest supported: ") as err:
        px.load(source, pretrained=False, **kwargs)
    near = str(err.value).split("closest supported: ")[1].split(", ")
    assert 1 <= len(near) <= 3 and all(n.startswith(source.split(":")[0] + ":") for n in near)
    from prisma_ext.sources import source_for

    prefix, _, name = source.partition(":")
    assert [f"{prefix}:{n}" for n in source_for(prefix).closest_supported(name)] == near
    with torch.device("meta"):  # each suggestion is taken by the TL backend's check
        from prisma_ext.adapters import adapter_for

        for n in near:
            if prefix == "timm":
                import timm

                module = timm.create_model(n.split(":")[1], pretrained=False)
            else:
                from prisma_ext.sources.open_clip import _meta_model

                module = _meta_model(n.split(":")[1])
            adapter_for(module).check(module)


def _still_refused():
    from timm.layers import GatedMlp
    from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock

    return [
        (dict(global_pool="avgmax", class_token=False), "avgmax"),
        (dict(block_fn=ParallelScalingBlock), "parallel attention and MLP"),
        (dict(block_fn=ResPostBlock), "post-norm"),
        (dict(mlp_layer=GatedMlp), "GatedMlp"),
    ]


@pytest.mark.parametrize("case", range(4))
def test_unsupported_vit_features_are_named(case):
    overrides, feature = _still_refused()[case]
    with pytest.raises(UnsupportedModelError, match=feature):
        px.load(small_timm("plain", **overrides))


def test_unknown_names_suggest_closest():
    with pytest.raises(UnknownNameError, match="vit_small_patch16_224"):
        px.load("timm:vit_smal_patch16_224", pretrained=False)
    with pytest.raises(UnknownNameError, match="timm"):
        px.load("tim:vit_small_patch16_224")
    with pytest.raises(UnknownNameError, match="prefix"):
        px.load("vit_small_patch16_224")
    with pytest.raises(PrismaError, match="backend"):
        px.load("timm:vit_small_patch16_224", backend="jax")


# ---------------------------------------------------------------- loading weights
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_local_checkpoint(tmp_path, suffix):
    src = small_timm("plain", seed=11)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pth":
        torch.save(src.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    hooked = px.load("timm:vit_base_patch16_224", pretrained=path, img_size=32, patch_size=8, **SMALL)
    x = images_for(src)
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), src(x), atol=1e-4, rtol=0)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(PrismaError, match="does not exist"):
        px.load("timm:vit_tiny_patch16_224", pretrained=tmp_path / "nope.pth")


def test_unreachable_hub_gives_clear_error(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PrismaError, match="pretrained=False"):
        px.load("timm:vit_tiny_patch16_224", pretrained=True)


def test_loads_class_names_for_imagenet_models():
    hooked = px.load("timm:vit_tiny_patch16_224", pretrained=False, depth=1)
    assert len(hooked.class_names) == 1000 and hooked.class_names[281].startswith("tabby")
    assert hooked.to_single_token("tabby") == 281
    with pytest.raises(UnknownNameError, match="tabby"):
        hooked.to_single_token("taby")


# ---------------------------------------------------------------- the contract
class TinyViTWithSites(TinyViTAdapter):
    """TinyViT on the nnsight backend too: its site map, written with the builder."""

    name = "tiny-vit-sites"

    def site_map(self, m):
        from prisma_ext.sitemaps import BlockSites, Heads, Site, SiteMap

        sites = SiteMap()
        for i, blk in enumerate(m.layers):
            p = f"layers.{i}"
            sites.block(i, BlockSites(resid_pre=Site(p, "input"), ln1=Site(f"{p}.pre_attn"),
                                      z=Site(f"{p}.out", "input", Heads(blk.heads)),
                                      attn_out=Site(f"{p}.out"), resid_mid=Site(f"{p}.pre_ff", "input", in_place=True),
                                      ln2=Site(f"{p}.pre_ff"), mlp_out=Site(f"{p}.ff"), resid_post=Site(p)))
        return sites.add("ln_final.hook_normalized", Site("norm")).done()


def test_a_site_map_written_with_the_builder_reads_the_tl_sites():
    src = randomize_(TinyViT().eval(), seed=3)
    adapter = register_adapter(TinyViTWithSites())
    try:
        traced, hooked = px.load(src, backend="nnsight"), px.load(src)
    finally:
        unregister_adapter("tiny-vit-sites")
    assert traced.site_names[:4] == ["blocks.0.hook_resid_pre", "blocks.0.ln1.hook_normalized",
                                     "blocks.0.attn.hook_z", "blocks.0.hook_attn_out"]
    assert traced.adapter is adapter
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _, want = hooked.run_with_cache(x)
        _, got = traced.run_with_cache(x)
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], atol=1e-5, rtol=0)
    dla_nn = px.direct_logit_attribution(traced, x, by=("layer", "head"))
    dla_tl = px.direct_logit_attribution(hooked, x, by=("layer", "head"))
    torch.testing.assert_close(dla_nn.values, dla_tl.values, atol=1e-5, rtol=0)


def test_to_hooked_always_checks():
    checked = []

    class Refusing(TinyViTAdapter):
        name = "refusing"

        def check(self, module):
            checked.append(type(module).__name__)
            raise UnsupportedModelError("a feature we do not convert")

    with pytest.raises(UnsupportedModelError, match="a feature we do not convert"):
        Refusing().to_hooked(TinyViT())
    assert checked == ["TinyViT"]
    with pytest.warns(DeprecationWarning, match="override convert"):
        class OldStyle(TinyViTAdapter):  # noqa: F841
            def to_hooked(self, module, **options):
                return None


def test_traced_class_and_the_old_to_traced_hook():
    from prisma_ext.traced.model import TracedViT

    class MyTraced(TracedViT):
        pass

    class WithClass(TinyViTWithSites):
        name = "with-class"
        traced_class = MyTraced

    class OldHook(TinyViTWithSites):
        name = "old-hook"

        def to_traced(self, module, **options):
            return MyTraced(module, adapter=self, **options)

    src = TinyViT().eval()
    assert type(px.traced.wrap(src, WithClass())) is MyTraced
    with pytest.warns(DeprecationWarning, match="traced_class"):
        assert type(px.traced.wrap(src, OldHook())) is MyTraced


def test_every_hugging_face_refusal_lists_every_supported_class():
    from transformers import BeitConfig, BeitModel

    with pytest.raises(UnsupportedModelError) as err:
        px.load(BeitModel(BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, image_size=16, patch_size=8)))
    for cls in ("CLIPModel", "CLIPVisionModel", "ViTForImageClassification", "ViTModel"):
        assert cls in str(err.value)
