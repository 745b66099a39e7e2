"""Random timm ViT configurations over every constructor option of `VisionTransformer` (and
`VisionTransformerDistilled`), every parameter randomised: each one either reproduces timm's own
forward within 1e-4, with and without each weight-processing option, or is refused by name
(`UnsupportedModelError` naming the feature, or a `PrismaError` naming the option). No silent
mismatch, no other exception. Configurations timm itself cannot build or run are skipped."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from torch import nn

import prisma_ext as px
from prisma_ext.errors import PrismaError, UnsupportedModelError
from prisma_ext.verification import VerificationError
from tests.support.models import randomize_

PROCESSING = [dict(fold_ln=True), dict(center_writing_weights=True), dict(fold_value_biases=True),
              dict(use_attn_result=True), dict(fold_ln=True, center_writing_weights=True, fold_value_biases=True)]
ATOL = RTOL = 1e-4


@st.composite
def timm_configs(draw):
    """About half the draws keep to options prisma-ext converts (so most of those must reproduce);
    the other half may also take any option it refuses (so those must be refused by name)."""
    layers = _layers()
    exotic = draw(st.booleans())

    def pick(supported, refused=()):
        return draw(st.sampled_from(list(supported) + (list(refused) if exotic else [])))

    patch = draw(st.sampled_from([4, 8, (4, 8)]))
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    grid = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    heads = draw(st.sampled_from([1, 2, 3, 4]))
    class_token = draw(st.sampled_from([True, True, False]))
    cfg = dict(
        img_size=(ph * grid[0], pw * grid[1]), patch_size=patch,
        in_chans=draw(st.sampled_from([3, 3, 1, 4])),
        num_classes=draw(st.sampled_from([5, 5, 0])),
        global_pool=pick(["token", "avg", "map"] if class_token else ["avg", "map"], ["", "avgmax", "max", "prr"]),
        embed_dim=heads * draw(st.sampled_from([4, 6, 8])), depth=draw(st.integers(1, 2)), num_heads=heads,
        mlp_ratio=draw(st.sampled_from([1.0, 2.0, 2.5])),
        qkv_bias=draw(st.booleans()), proj_bias=draw(st.booleans()),
        qk_norm=draw(st.sampled_from([False, False, True])),
        scale_attn_norm=draw(st.sampled_from([False, False, True])),
        scale_mlp_norm=draw(st.sampled_from([False, False, True])),
        init_values=draw(st.sampled_from([None, None, 0.5])),
        class_token=class_token,
        pos_embed=draw(st.sampled_from(["learn", "learn", "none", ""])),
        no_embed_class=draw(st.booleans()), reg_tokens=draw(st.sampled_from([0, 0, 1, 2])),
        pre_norm=draw(st.booleans()), final_norm=draw(st.sampled_from([True, True, False])),
        fc_norm=draw(st.sampled_from([None, None, True, False])), pool_include_prefix=draw(st.booleans()),
        dynamic_img_size=draw(st.sampled_from([False, False, True])),
        dynamic_img_pad=pick([False], [True]),
        drop_rate=draw(st.sampled_from([0.0, 0.2])), pos_drop_rate=draw(st.sampled_from([0.0, 0.2])),
        patch_drop_rate=draw(st.sampled_from([0.0, 0.0, 0.25])), proj_drop_rate=draw(st.sampled_from([0.0, 0.2])),
        attn_drop_rate=draw(st.sampled_from([0.0, 0.2])), drop_path_rate=draw(st.sampled_from([0.0, 0.2])),
        embed_norm_layer=draw(st.sampled_from([None, None, "same"])),
        norm_layer=pick([None, "layernorm", "rmsnorm", functools.partial(nn.LayerNorm, elementwise_affine=False)],
                        ["layernorm2d"]),
        act_layer=pick([None, "gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "tanh", "mish"], ["elu", "selu"]),
        block_fn=pick(layers["block_fn"][:1], layers["block_fn"][1:]),
        mlp_layer=draw(st.sampled_from(layers["mlp_layer"])),
    )
    if cfg["embed_norm_layer"] == "same":  # AIMv2: the patch embedding normalises with the model's norm
        cfg["embed_norm_layer"] = cfg["norm_layer"] or "layernorm"
    distilled = draw(st.sampled_from([False, False, False, True]))
    other_size = draw(st.booleans())
    traced = draw(st.sampled_from([False, False, True]))
    return cfg, distilled, other_size, traced


def _layers():
    from timm.layers import GatedMlp, GluMlp, Mlp, SwiGLU, SwiGLUPacked
    from timm.models.vision_transformer import Block, ParallelScalingBlock, ResPostBlock

    return dict(block_fn=[Block, ResPostBlock, ParallelScalingBlock],
                mlp_layer=[Mlp, Mlp, SwiGLU, GluMlp, SwiGLUPacked, GatedMlp])


def build(cfg: dict, distilled: bool) -> nn.Module | None:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    cls = VisionTransformerDistilled if distilled else VisionTransformer
    try:
        model = cls(**cfg)
    except (AssertionError, TypeError, ValueError, RuntimeError, AttributeError):
        return None  # timm refuses (or fails on) this combination itself
    return randomize_(model.eval(), seed=1)


def source_output(model: nn.Module, images: torch.Tensor) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            return model(images)
    except (AssertionError, RuntimeError, ValueError, TypeError):
        return None  # timm's own forward fails on this combination


def check_refusal(err: Exception) -> None:
    text = str(err)
    assert "not supported" in text or "refuse" in text or "needs" in text or "cannot" in text, text
    assert "internal" not in text, text


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(timm_configs())
def test_every_timm_configuration_reproduces_or_is_refused_by_name(drawn):
    cfg, distilled, other_size, traced = drawn
    note(f"config: {cfg}, distilled={distilled}")
    model = build(cfg, distilled)
    if model is None:
        event("timm cannot build it")
    assume(model is not None)
    h, w = cfg["img_size"]
    if other_size and cfg["dynamic_img_size"]:
        h, w = h + model.patch_embed.patch_size[0], w
    images = torch.randn(2, cfg["in_chans"], h, w, generator=torch.Generator().manual_seed(2))
    reproduce_or_refuse(model, images, traced, refused=lambda err: "refused",
                        reproduced=lambda hooked: f"reproduced: pool {cfg['global_pool']}, final norm "
                                                  f"{hooked.cfg.final_norm}")


def reproduce_or_refuse(model: nn.Module, images: torch.Tensor, traced: bool, refused, reproduced) -> None:
    """The property every drawn configuration must have: px.load reproduces timm's output on
    `images` within 1e-4 (with and without each processing option; on the nnsight backend too
    when `traced`), or refuses with the feature named. A VerificationError is a defect, never a
    refusal. `refused(err)` / `reproduced(hooked)` label the hypothesis event."""
    reference = source_output(model, images)
    if reference is None:
        event("timm cannot run it")
    assume(reference is not None)
    try:
        hooked = px.load(model)
    except UnsupportedModelError as err:
        check_refusal(err)
        event(refused(err))
        return
    event("reproduced")
    if traced:  # the nnsight backend: px.load reads every mapped site once and compares it with the TL model's
        px.load(model, backend="nnsight")
        event("traced")
    event(reproduced(hooked))
    with torch.no_grad():
        torch.testing.assert_close(hooked(images), reference, atol=ATOL, rtol=RTOL)
    for options in PROCESSING:
        try:
            processed = px.load(model, **options)
        except VerificationError:
            raise  # a conversion that does not reproduce its source is a defect, not a refusal
        except PrismaError as err:
            check_refusal(err)
            assert any(name in str(err) for name in options), (options, str(err))
            continue
        with torch.no_grad():
            got = processed(images)
        torch.testing.assert_close(got, reference, atol=ATOL, rtol=RTOL, msg=lambda m, o=options: f"{o}: {m}")


@pytest.mark.parametrize(("overrides", "feature"), [
    (dict(global_pool="map", fc_norm=True), None),
    (dict(global_pool="map", fc_norm=True, class_token=False), None),
])
def test_map_pooling_with_fc_norm_folds_the_norm_after_the_pool(overrides, feature):
    """Fuzzer finding: map pooling + fc_norm + fold_ln folded the final norm into the pool, but the
    norm comes after it (wrong by 0.07-0.42); center_writing_weights there was wrong by 0.016 (the
    attention pool reads the raw residual stream, not a norm): now refused by name."""
    from timm.models.vision_transformer import VisionTransformer

    model = randomize_(VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3,
                                         num_classes=5, **overrides).eval(), seed=3)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model(images)
        torch.testing.assert_close(px.load(model, fold_ln=True)(images), reference, atol=ATOL, rtol=RTOL)
    with pytest.raises(PrismaError, match="center_writing_weights"):
        px.load(model, center_writing_weights=True)


def test_distilled_variants_fuzzing_found():
    """Fuzzer findings: VisionTransformerDistilled with fc_norm=True (timm's distilled head never
    applies fc_norm: wrong by 0.43), with reg_tokens=2 (its forward never adds them: a shape error
    here), with num_classes=0 (no heads: 'weights lack head_dist.weight'). Each now reproduces, on
    both backends."""
    from timm.models.deit import VisionTransformerDistilled

    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    for overrides in (dict(fc_norm=True), dict(reg_tokens=2), dict(num_classes=0)):
        model = randomize_(VisionTransformerDistilled(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3,
                                                      **{"num_classes": 5, **overrides}).eval(), seed=5)
        with torch.no_grad():
            reference = model(images)
            torch.testing.assert_close(px.load(model)(images), reference, atol=ATOL, rtol=RTOL, msg=str(overrides))
            torch.testing.assert_close(px.load(model, fold_ln=True)(images), reference, atol=ATOL, rtol=RTOL)
        traced = px.load(model, backend="nnsight")
        output, cache = traced.run_with_cache(images)
        torch.testing.assert_close(output, reference, atol=1e-5, rtol=0)  # every site read: explicit attention
        assert cache, overrides


def test_fold_ln_without_a_head_or_projection():
    """Fuzzer finding: fold_ln=True on a model whose final norm feeds nothing linear (timm
    num_classes=0) raised AttributeError in processing: the norm now stays affine there."""
    from timm.models.vision_transformer import VisionTransformer

    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    for pool in ("token", "avg"):
        model = randomize_(VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3,
                                             num_classes=0, global_pool=pool).eval(), seed=6)
        with torch.no_grad():
            torch.testing.assert_close(px.load(model, fold_ln=True)(images), model(images), atol=ATOL, rtol=RTOL)


def test_refusal_wording_names_the_real_feature():
    """Fuzzer findings on wording: a PatchEmbed subclass with PatchEmbed's maths was refused as a
    hybrid stem; a LayerNorm without affine parameters was "norm_pre LayerNorm is not supported";
    an unsupported MLP was "MLP type SwiGLU (e.g. SwiGLU)" (SwiGLU is supported since; GatedMlp is not)."""
    from timm.layers import GatedMlp, PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    class MyPatchEmbed(PatchEmbed):
        pass

    small = dict(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=3, num_classes=5)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    for extra in (dict(embed_layer=MyPatchEmbed), dict(norm_layer=functools.partial(nn.LayerNorm,
                                                                                     elementwise_affine=False),
                                                       pre_norm=True)):
        model = randomize_(VisionTransformer(**small, **extra).eval(), seed=7)
        with torch.no_grad():
            torch.testing.assert_close(px.load(model)(images), model(images), atol=ATOL, rtol=RTOL)
    with pytest.raises(UnsupportedModelError) as err:
        px.load(VisionTransformer(**small, mlp_layer=GatedMlp))
    assert "GatedMlp" in str(err.value) and "(e.g." not in str(err.value)
