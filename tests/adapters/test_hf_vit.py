"""Hugging Face ViT classifiers (`ViTForImageClassification`, `ViTModel` with or without its pooler):
the TL backend equals transformers' own forward, the nnsight backend's sites equal the TL backend's, and
remote tracing (nnsight's local simulation, prisma_ext hidden) equals a local trace."""

from __future__ import annotations

import pytest
import torch
from nnsight import save
from transformers import ViTConfig, ViTForImageClassification, ViTForMaskedImageModeling, ViTModel

import prisma_ext as px
from prisma_ext.errors import PrismaError, UnsupportedModelError
from tests.support.models import module_hooks, randomize_

SMALL = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
             image_size=32, patch_size=8, num_labels=5)
VARIANTS = {"plain": {}, "gelu_new_no_qkv_bias": dict(hidden_act="gelu_new", qkv_bias=False, layer_norm_eps=1e-6),
            "non_square": dict(image_size=(32, 24), hidden_act="quick_gelu")}


def small_vit(variant: str = "plain", seed: int = 0, cls=ViTForImageClassification, **kw) -> torch.nn.Module:
    config = ViTConfig(**{**SMALL, **VARIANTS[variant]}, id2label={i: f"class {i}" for i in range(5)})
    return randomize_(cls(config, **kw).eval(), seed)


def images_for(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = model.config.image_size
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_every_block_equal_transformers(variant):
    src = small_vit(variant)
    hooked, images = px.load(src), images_for(src)
    with torch.no_grad():
        ref = src(pixel_values=images, output_hidden_states=True)
        logits, cache = hooked.run_with_cache(images)
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], ref.hidden_states[0], atol=1e-4, rtol=0)
    for i in range(SMALL["num_hidden_layers"]):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_post"], ref.hidden_states[i + 1],
                                   atol=1e-4, rtol=0, msg=f"block {i}")
    cfg = hooked.cfg
    assert (cfg.n_classes, cfg.n_heads, cfg.d_head, cfg.eps) == (5, 3, 16, src.config.layer_norm_eps)
    assert hooked.class_names == [f"class {i}" for i in range(5)]


@pytest.mark.parametrize("options", [dict(fold_ln=True), dict(center_writing_weights=True),
                                     dict(fold_ln=True, center_writing_weights=True, fold_value_biases=True)])
def test_weight_processing_keeps_the_logits(options):
    src = small_vit(seed=2)
    images = images_for(src)
    with torch.no_grad():
        torch.testing.assert_close(px.load(src, **options)(images), src(pixel_values=images).logits,
                                   atol=1e-4, rtol=0)


def test_vit_model_without_pooler_has_no_head():
    src = small_vit(seed=3, cls=ViTModel, add_pooling_layer=False)
    hooked, images = px.load(src), images_for(src)
    with torch.no_grad():
        out = src(pixel_values=images, output_hidden_states=True)
        torch.testing.assert_close(hooked(images), out.last_hidden_state[:, 0], atol=1e-4, rtol=0)
        torch.testing.assert_close(hooked(images, return_type="resid"), out.hidden_states[-1], atol=1e-4, rtol=0)
    assert hooked.cfg.n_classes == 0
    traced = px.load(src, backend="nnsight")
    with torch.no_grad():
        _, tl_cache = hooked.run_with_cache(images)
        out, cache = traced.run_with_cache(images)
    assert "hook_pooled" not in cache
    for name, value in cache.items():
        torch.testing.assert_close(value, tl_cache[name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(cache["ln_final.hook_normalized"], out.last_hidden_state, atol=0, rtol=0)


def test_vit_model_pooler_is_a_module_head():
    """ViTModel's pooler (dense + tanh on the normalised class token): a module head whose output is
    `pooler_output`, on both backends; the methods that need a linear readout refuse it."""
    src = small_vit("non_square", seed=9, cls=ViTModel)
    hooked, traced, images = px.load(src), px.load(src, backend="nnsight"), images_for(src)
    with torch.no_grad():
        out = src(pixel_values=images)
        torch.testing.assert_close(hooked(images), out.pooler_output, atol=1e-4, rtol=0)
        _, tl_cache = hooked.run_with_cache(images)
        traced_out, cache = traced.run_with_cache(images)
    assert (hooked.cfg.head_type, hooked.cfg.n_classes) == ("module", 48) and "hook_pooled" in cache
    for name, value in cache.items():
        torch.testing.assert_close(value, tl_cache[name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(traced_out.pooler_output, out.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(px.logit_lens(traced, images).values, px.logit_lens(hooked, images).values,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(PrismaError, match="linear head"):
        px.direct_logit_attribution(hooked, images, 1, by=("layer",))


@pytest.mark.parametrize("variant", ["plain", "gelu_new_no_qkv_bias"])
def test_nnsight_sites_equal_the_tl_backend(variant):
    src = small_vit(variant, seed=4)
    hooked, traced, images = px.load(src), px.load(src, backend="nnsight"), images_for(src)
    with torch.no_grad():
        _, tl_cache = hooked.run_with_cache(images)
        out, cache = traced.run_with_cache(images)
    assert type(traced).__name__ == "TracedViT" and list(cache) == traced.site_names
    assert len(cache) == 2 + 2 * 14 + 1 and "blocks.1.attn.hook_pattern" in cache
    for name, value in cache.items():
        torch.testing.assert_close(value, tl_cache[name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(out.logits, src(pixel_values=images).logits, atol=1e-5, rtol=0)
    assert traced.layout == hooked.layout
    assert src.config._attn_implementation == "sdpa" and not module_hooks(src)


def test_an_nnsight_edit_equals_the_same_tl_edit():
    src = small_vit(seed=5)
    hooked, traced, images = px.load(src), px.load(src, backend="nnsight"), images_for(src)
    uniform = torch.full((2, 3, 17, 17), 1 / 17)
    with torch.no_grad():
        with traced.trace(images):
            traced.set_site("blocks.0.attn.hook_pattern", uniform)
            z = traced.site("blocks.1.attn.hook_z")
            z[:, :, 1] = 0
            logits = traced.output.logits.save()
        z_hook = ("blocks.1.attn.hook_z", lambda t, hook: torch.cat([t[:, :, :1], 0 * t[:, :, 1:2], t[:, :, 2:]], 2))
        expected = hooked.run_with_hooks(images, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: uniform),
                                                            z_hook])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert all(layer.attention.config is src.config for layer in src.vit.layers)


# ---------------------------------------------------------------- saved folders, remote
@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    src = small_vit(seed=6)
    folder = tmp_path_factory.mktemp("vit")
    src.save_pretrained(folder)
    return src, str(folder)


def test_hf_folder_loads_both_classes(saved_vit, tmp_path):
    src, folder = saved_vit
    images = images_for(src)
    with torch.no_grad():
        torch.testing.assert_close(px.load(f"hf:{folder}")(images), src(pixel_values=images).logits,
                                   atol=1e-4, rtol=0)
    bare = small_vit(seed=7, cls=ViTModel, add_pooling_layer=False)
    bare.save_pretrained(tmp_path / "bare")
    loaded = px.load(f"hf:{tmp_path / 'bare'}")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), bare(pixel_values=images).last_hidden_state[:, 0],
                                   atol=1e-4, rtol=0)
    assert loaded.cfg.head_type == "linear" and loaded.cfg.n_classes == 0  # built as saved: no pooler
    pooled = small_vit(seed=8, cls=ViTModel)
    pooled.save_pretrained(tmp_path / "pooled")
    loaded = px.load(f"hf:{tmp_path / 'pooled'}")
    assert loaded.cfg.head_type == "module"
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), pooled(pixel_values=images).pooler_output, atol=1e-4, rtol=0)
    masked = small_vit(seed=9, cls=ViTForMaskedImageModeling)
    masked.save_pretrained(tmp_path / "masked")  # a folder naming a class no adapter converts: refused by name
    with pytest.raises(UnsupportedModelError, match="ViTForMaskedImageModeling"):
        px.load(f"hf:{tmp_path / 'masked'}")


def test_nnsight_analysis_of_a_vit_model_without_pooler():
    """Its output has no pooler_output (None): the analysis reads the normalised class token."""
    src = small_vit(seed=10, cls=ViTModel, add_pooling_layer=False)
    images = images_for(src)
    hooked, traced = px.load(src), px.load(src, backend="nnsight")
    target = px.FunctionTarget(lambda out: out[:, 0] - out[:, 1])  # two features of the class token
    on_tl = px.activation_patching(hooked, images[:1], images[1:], target, sites=("resid_pre",), progress=False)
    on_nn = px.activation_patching(traced, images[:1], images[1:], target, sites=("resid_pre",), progress=False)
    torch.testing.assert_close(on_nn["resid_pre"].values, on_tl["resid_pre"].values, atol=1e-5, rtol=0)


def traced_values(model, images):
    """Read a pattern, edit block 1's attention, read later sites and the logits."""
    uniform = torch.full((2, 3, 17, 17), 1 / 17)
    with torch.no_grad():
        with model.trace(images):
            values = save([model.site("blocks.0.attn.hook_pattern")])
            model.set_site("blocks.1.attn.hook_pattern", uniform)
            values.append(model.site("blocks.1.hook_resid_post"))
            values.append(model.site("hook_pooled"))
            logits = model.output.logits.save()
    return values, logits


def test_remote_local_simulation_equals_a_local_trace(saved_vit):
    from nnsight.modeling.mixins.remotable import Remotable
    from nnsight.modeling.transformers import TransformersModel

    from tests.support.hidden import local_simulation_hides_prisma_ext

    src, folder = saved_vit
    remote = px.load(f"hf:{folder}", backend="nnsight", remote="local")
    assert isinstance(remote, Remotable) and type(remote).__name__ == "RemoteTracedViT"
    assert remote._remoteable_class() is TransformersModel and remote.task == "image-classification"  # the key
    assert not remote.dispatched
    local = px.load(src, backend="nnsight")
    images = images_for(src)
    expected, expected_logits = traced_values(local, images)
    with local_simulation_hides_prisma_ext() as hides:  # serialised, rebuilt without prisma_ext, run
        got, logits = traced_values(remote, images)
    assert hides and hides[0].checked and not hides[0].attempts
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(logits, expected_logits, atol=0, rtol=0)
    assert remote.site_names == local.site_names and not module_hooks(remote._module)
    with pytest.raises(PrismaError, match="local folder"):
        px.load(f"hf:{folder}", backend="nnsight", remote=True).to_model_key()


# ---------------------------------------------------------------- refusals
def test_refusals_name_the_feature(tmp_path):
    with pytest.raises(UnsupportedModelError, match="activation 'gelu_fast'"):
        px.load(ViTForImageClassification(ViTConfig(**SMALL, hidden_act="gelu_fast")))
    with pytest.raises(UnsupportedModelError, match="ViTForMaskedImageModeling is not supported; supported: "
                                                    ".*ViTForImageClassification, ViTModel"):
        px.load(ViTForMaskedImageModeling(ViTConfig(**SMALL)))
    src = small_vit(cls=ViTForMaskedImageModeling)
    src.save_pretrained(tmp_path / "mim")
    with pytest.raises(PrismaError, match="remote tracing takes ViTForImageClassification"):
        px.load(f"hf:{tmp_path / 'mim'}", backend="nnsight", remote="local")


def test_the_analysis_layer_on_a_traced_hugging_face_vit():
    """The traced classifier's output is an ImageClassifierOutput: the methods read its logits."""
    src = small_vit(seed=8)
    images = images_for(src)
    tl, nn = px.load(src), px.load(src, backend="nnsight")
    for method in (lambda m: px.direct_logit_attribution(m, images, 1, by=("layer", "head", "source")),
                   lambda m: px.logit_lens(m, images), lambda m: px.gradient_attention(m, images, 2)):
        torch.testing.assert_close(method(nn).values, method(tl).values, atol=1e-5, rtol=1e-5)
    a = px.activation_patching(tl, images[:1], images[1:], px.LogitDiff(0, 1), sites="z", progress=False)
    b = px.activation_patching(nn, images[:1], images[1:], px.LogitDiff(0, 1), sites="z", progress=False)
    torch.testing.assert_close(b["z"].values, a["z"].values, atol=1e-5, rtol=0)


def test_fold_ln_on_a_model_without_head_keeps_the_final_norm(tmp_path):
    """Fuzzer finding: fold_ln=True on HF ViTModel / CLIPVisionModel (nothing linear reads the final
    norm) raised AttributeError in processing."""
    from tests.support.clip_models import small_hf_clip

    bare = small_vit(seed=7, cls=ViTModel, add_pooling_layer=False)
    images = images_for(bare)
    with torch.no_grad():
        torch.testing.assert_close(px.load(bare, fold_ln=True)(images),
                                   bare(pixel_values=images).last_hidden_state[:, 0], atol=1e-4, rtol=1e-4)
    from transformers import CLIPVisionModel

    clip = small_hf_clip(seed=3)
    vision = CLIPVisionModel(clip.config.vision_config).eval()
    vision.load_state_dict(clip.vision_model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(px.load(vision, fold_ln=True)(x), vision(pixel_values=x).pooler_output,
                                   atol=1e-4, rtol=1e-4)
