"""Hugging Face DINOv2 (with and without registers), DINOv3 ViT and DeiT: the TL backend equals
transformers' own forward (output and every block), the nnsight backend's sites equal the TL
backend's, saved folders load by `hf:`, the analysis methods agree across backends, and what is
not reproduced is refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForMaskedImageModeling,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    DINOv3ViTBackbone,
    DINOv3ViTConfig,
    DINOv3ViTModel,
)

import prisma_ext as px
from prisma_ext.adapters.hf_common import class_for
from prisma_ext.errors import InputError, PrismaError, UnsupportedModelError
from tests.support.hf_models import CONFIGS, SMALL
from tests.support.hf_models import small_dino as small
from tests.support.models import module_hooks


def images_for(model: torch.nn.Module, batch: int = 2, seed: int = 1, size=None) -> torch.Tensor:
    h, w = size or px.load(model, verify=False).cfg.img_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def reference(model: torch.nn.Module, images: torch.Tensor):
    """(the source's own output tensor, its hidden states: the embedding, then each layer's output)."""
    out = model(pixel_values=images, output_hidden_states=True)
    if hasattr(out, "logits"):
        return out.logits, out.hidden_states
    pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
    return pooled, out.hidden_states


def assert_sites_equal(cache, tl_cache, atol=1e-5):
    for name, value in cache.items():
        torch.testing.assert_close(value, tl_cache[name], atol=atol, rtol=0, msg=name)


# ---------------------------------------------------------------- both backends
@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_backends_reproduce_transformers(name):
    src = small(name)
    hooked, traced = px.load(src), px.load(src, backend="nnsight")
    images = images_for(src)
    with torch.no_grad():
        got, tl_cache = hooked.run_with_cache(images)
        out, cache = traced.run_with_cache(images)
        assert not module_hooks(src)  # before transformers' own output_hidden_states hooks
        want, hidden = reference(src, images)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(tl_cache["blocks.0.hook_resid_pre"], hidden[0], atol=1e-4, rtol=0)
    for i in range(SMALL["num_hidden_layers"]):
        torch.testing.assert_close(tl_cache[f"blocks.{i}.hook_resid_post"], hidden[i + 1], atol=1e-4, rtol=0,
                                   msg=f"block {i}")
    # the nnsight backend: every mapped site equals the TL site; the source itself is untouched
    assert list(cache) == traced.site_names and "blocks.1.attn.hook_pattern" in cache
    assert_sites_equal(cache, tl_cache)
    torch.testing.assert_close(reference(src, images)[0], want, atol=0, rtol=0)
    assert traced.layout == hooked.layout and src.config._attn_implementation == "sdpa"
    rotary = name.startswith("dinov3")
    assert ("blocks.1.attn.hook_rot_q" in cache) == rotary and ("blocks.1.attn.hook_rot_k" in cache) == rotary
    assert ("blocks.0.mlp.hook_pre_linear" in cache) == ("swiglu" in name or "gated" in name)


def test_token_layouts_and_heads():
    cfgs = {name: px.load(small(name), verify=False).cfg for name in CONFIGS}
    assert (cfgs["dinov2_registers"].n_reg, cfgs["dinov2_registers"].pos_embed_on_prefix) == (3, False)
    assert (cfgs["dinov3"].n_reg, cfgs["dinov3"].rotary, cfgs["dinov3"].has_pos_embed) == (2, "half", False)
    assert cfgs["dinov2_swiglu_no_qkv_bias"].act_fn == "silu" and cfgs["dinov2_swiglu_no_qkv_bias"].gated_mlp
    teacher, classifier = cfgs["deit_teacher_non_square"], cfgs["deit_classifier"]
    assert (teacher.n_dist, teacher.n_reg, teacher.n_classes, teacher.img_size) == (1, 0, 5, (32, 24))
    assert (classifier.n_dist, classifier.n_reg, classifier.act_fn) == (0, 1, "quick_gelu")  # the unread dist token
    pooler = cfgs["deit_model_pooler"]
    assert (pooler.head_type, pooler.n_classes, cfgs["deit_model_bare"].n_classes) == ("module", 40, 0)
    assert px.load(small("deit_classifier"), verify=False).class_names == [f"class {i}" for i in range(5)]


def test_dinov3_takes_other_image_sizes_on_both_backends():
    src = small("dinov3_gated_biases_non_square", seed=2)
    hooked, traced = px.load(src), px.load(src, backend="nnsight")
    images = images_for(src, size=(40, 56))
    with torch.no_grad():
        want, hidden = reference(src, images)
        got, tl_cache = hooked.run_with_cache(images)
        _, cache = traced.run_with_cache(images)
        torch.testing.assert_close(hooked.run_from(tl_cache["blocks.1.hook_resid_pre"], 1), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(tl_cache["blocks.1.hook_resid_post"], hidden[2], atol=1e-4, rtol=0)
    assert_sites_equal(cache, tl_cache)


def test_a_rotary_edit_equals_the_same_tl_edit():
    """The rotated keys and the pattern, served by the swapped-in DINOv3 attention, are real edits."""
    src = small("dinov3", seed=6)
    hooked, traced, images = px.load(src), px.load(src, backend="nnsight"), images_for(src)
    n = 1 + 2 + 16
    uniform = torch.full((2, 3, n, n), 1 / n)
    with torch.no_grad():
        with traced.trace(images):
            traced.site("blocks.0.attn.hook_rot_k")[:, 3:] *= 0.5
            traced.set_site("blocks.1.attn.hook_pattern", uniform)
            out = traced.output.pooler_output.save()
        expected = hooked.run_with_hooks(images, fwd_hooks=[
            ("blocks.0.attn.hook_rot_k", lambda t, hook: torch.cat([t[:, :3], 0.5 * t[:, 3:]], 1)),
            ("blocks.1.attn.hook_pattern", lambda t, hook: uniform)])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    assert (out - hooked(images)).abs().max() > 1e-2  # the edits changed the output
    assert not module_hooks(src) and all(layer.attention.config is src.config for layer in src.model.layer)


def test_dinov2_and_deit_refuse_other_image_sizes():
    """Their sources resample positions with their own bicubic resize; the hooked model takes only
    the size the positions were made for (instead of a silently different resampling)."""
    for name in ("dinov2", "deit_classifier"):
        with pytest.raises(InputError, match="fixed size"):
            px.load(small(name), verify=False)(torch.randn(1, 3, 56, 56))


@pytest.mark.parametrize("options", [dict(fold_ln=True, center_writing_weights=True, fold_value_biases=True)])
@pytest.mark.parametrize("name", ["dinov2_registers", "dinov3", "deit_teacher_non_square", "deit_model_pooler"])
def test_weight_processing_keeps_the_output(name, options):
    src = small(name, seed=3)
    images = images_for(src)
    with torch.no_grad():
        torch.testing.assert_close(px.load(src, **options)(images), reference(src, images)[0], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- saved folders
def test_hf_folders_load(tmp_path):
    for name in ("dinov2", "dinov2_registers", "dinov3", "deit_teacher_non_square", "deit_model_pooler"):
        src = small(name, seed=4)
        folder = tmp_path / name
        src.save_pretrained(folder)
        images = images_for(src)
        with torch.no_grad():
            want = reference(src, images)[0]
            torch.testing.assert_close(px.load(f"hf:{folder}")(images), want, atol=1e-4, rtol=0, msg=name)
            if name == "dinov3":
                loaded = px.load("hf:saved-dinov3", pretrained=folder, backend="nnsight")
                torch.testing.assert_close(loaded(images).pooler_output, want, atol=1e-4, rtol=0)


def test_model_types_name_the_default_classes():
    assert class_for(Dinov2Config()) == "Dinov2Model"
    assert class_for(Dinov2WithRegistersConfig()) == "Dinov2WithRegistersModel"
    assert class_for(DINOv3ViTConfig()) == "DINOv3ViTModel"
    assert class_for(DeiTConfig()) == "DeiTForImageClassificationWithTeacher"
    assert class_for(DeiTConfig(architectures=["DeiTForImageClassification"])) == "DeiTForImageClassification"


# ---------------------------------------------------------------- the analysis layer
@pytest.mark.parametrize("name", ["deit_teacher_non_square", "deit_classifier", "dinov3", "deit_model_pooler"])
def test_analysis_agrees_across_backends(name):
    src = small(name, seed=5)
    images = images_for(src)
    tl, nn = px.load(src), px.load(src, backend="nnsight")
    torch.testing.assert_close(px.attention_rollout(nn, images).values, px.attention_rollout(tl, images).values,
                               atol=1e-5, rtol=1e-5)
    if tl.head is None:  # DINO: no head to read through
        with pytest.raises(PrismaError, match="has none"):
            px.logit_lens(tl, images)
        return
    torch.testing.assert_close(px.logit_lens(nn, images).values, px.logit_lens(tl, images).values,
                               atol=1e-5, rtol=1e-5)
    if tl.readout.is_linear:
        dla = [px.direct_logit_attribution(m, images, 1, by=("layer",)) for m in (tl, nn)]
        torch.testing.assert_close(dla[1].values, dla[0].values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dla[0].values.sum(-1), tl(images)[:, 1], atol=1e-4, rtol=0)
    elif tl.cfg.head_type == "module":
        with pytest.raises(PrismaError, match="linear head"):
            px.direct_logit_attribution(tl, images, 1, by=("layer",))


# ---------------------------------------------------------------- refusals
def test_refusals_name_the_feature():
    concat = Dinov2ForImageClassification(Dinov2Config(**SMALL, image_size=28, patch_size=7, num_labels=3))
    for backend in ("tl", "nnsight"):
        with pytest.raises(UnsupportedModelError, match=r"concat\(CLS, mean of patches\).*is not supported"):
            px.load(concat, backend=backend)
    registers = Dinov2WithRegistersForImageClassification(Dinov2WithRegistersConfig(**SMALL, image_size=32,
                                                                                     patch_size=8))
    with pytest.raises(UnsupportedModelError, match="mean of the patch tokens"):
        px.load(registers)
    with pytest.raises(UnsupportedModelError, match="feature maps is not supported"):
        px.load(DINOv3ViTBackbone(DINOv3ViTConfig(**SMALL, intermediate_size=96, image_size=32, patch_size=8)))
    with pytest.raises(UnsupportedModelError, match="masked image modeling"):
        px.load(DeiTForMaskedImageModeling(DeiTConfig(**SMALL, intermediate_size=96, image_size=32, patch_size=8)))
    with pytest.raises(UnsupportedModelError, match="non-square image_size"):
        px.load(Dinov2Model(Dinov2Config(**SMALL, image_size=(32, 24), patch_size=8)))
    with pytest.raises(UnsupportedModelError, match="activation 'gelu_fast'"):
        px.load(DINOv3ViTModel(DINOv3ViTConfig(**SMALL, intermediate_size=96, image_size=32, patch_size=8,
                                               hidden_act="gelu_fast")))
