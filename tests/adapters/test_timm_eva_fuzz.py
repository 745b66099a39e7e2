"""Random timm `Eva` configurations over its constructor options (rotary types and their settings,
fused or separate qkv, SwiGLU / GLU MLPs and their norms, inner attention norms, qk-norm, RMSNorm,
registers, layer scale, pooling and final norms, dynamic sizes), every parameter randomised
(the learned frequencies of mixed RoPE included): each one reproduces timm's own forward within
1e-4, with and without each weight-processing option, or is refused by name. No silent
mismatch, no other exception. Configurations timm itself cannot build or run are skipped."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

import prisma_ext as px
from prisma_ext.errors import UnsupportedModelError
from tests.adapters.test_timm_fuzz import reproduce_or_refuse
from tests.support.models import randomize_

ATOL = RTOL = 1e-4


@st.composite
def eva_configs(draw):
    """About half the draws keep to options prisma-ext converts; the other half may also take the
    options it refuses (post-norm blocks, gated attention, grouped-query attention, max pooling)."""
    exotic = draw(st.booleans())

    def pick(supported, refused=()):
        return draw(st.sampled_from(list(supported) + (list(refused) if exotic else [])))

    patch = draw(st.sampled_from([4, 8]))
    grid = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    heads = draw(st.sampled_from([1, 2, 3]))
    depth = draw(st.integers(1, 2))
    class_token = draw(st.sampled_from([True, True, False]))
    rope = draw(st.sampled_from([True, True, True, False]))
    rope_type = draw(st.sampled_from(["cat", "mixed", "dinov3", "mrope"]))
    attn_type = draw(st.sampled_from(["eva", "rope"]))
    cfg = dict(
        img_size=(patch * grid[0], patch * grid[1]), patch_size=patch,
        in_chans=draw(st.sampled_from([3, 3, 1])), num_classes=draw(st.sampled_from([5, 5, 0])),
        global_pool=pick(["token", "avg", "map"] if class_token else ["avg", "map"], ["avgmax", "max"]),
        embed_dim=heads * draw(st.sampled_from([8, 16])), depth=depth, num_heads=heads,
        qkv_bias=draw(st.booleans()), qkv_fused=draw(st.booleans()), qk_norm=draw(st.sampled_from([False, True])),
        mlp_ratio=draw(st.sampled_from([1.0, 2.0, 8 / 3])),
        swiglu_mlp=draw(st.booleans()), swiglu_align_to=draw(st.sampled_from([0, 0, 8])),
        scale_mlp=draw(st.booleans()), scale_attn_inner=draw(st.booleans()), attn_type=attn_type,
        norm_layer=draw(st.sampled_from(_norms())),
        init_values=draw(st.sampled_from([None, None, 0.5])),
        attn_only_layer_scale=draw(st.booleans()),
        class_token=class_token, num_reg_tokens=draw(st.sampled_from([0, 0, 1, 4])),
        no_embed_class=draw(st.booleans()), use_abs_pos_emb=draw(st.booleans()),
        use_rot_pos_emb=rope, rope_type=rope_type,
        rope_grid_offset=draw(st.sampled_from([0.0, 1.0])), rope_grid_indexing=draw(st.sampled_from(["ij", "xy"])),
        rope_temperature=draw(st.sampled_from([10000.0, 100.0])),
        rope_rotate_half=draw(st.booleans()) if rope_type in ("cat", "dinov3") else rope_type == "mrope",
        rope_rescale_coords=draw(st.sampled_from([None, 2.0])),
        ref_feat_shape=draw(st.sampled_from([None, (4, 4)])) if rope_type == "cat" else None,
        use_post_norm=pick([False], [True]),
        use_pre_transformer_norm=draw(st.booleans()),
        use_post_transformer_norm=draw(st.sampled_from([None, True, False])),
        use_fc_norm=draw(st.sampled_from([None, True, False])),
        attn_pool_num_heads=draw(st.sampled_from([None, 1])),
        dynamic_img_size=draw(st.sampled_from([False, False, True])),
        drop_path_rate=draw(st.sampled_from([0.0, 0.2])), attn_drop_rate=draw(st.sampled_from([0.0, 0.2])),
        patch_drop_rate=draw(st.sampled_from([0.0, 0.0, 0.25])),
    )
    if exotic and attn_type == "rope" and not cfg["qkv_fused"] and draw(st.booleans()):
        cfg["num_kv_heads"] = 1  # grouped-query attention (refused)
    other_size = draw(st.booleans())
    traced = draw(st.sampled_from([False, False, True]))
    return cfg, other_size, traced


def _norms():
    import functools

    from timm.layers import LayerNorm, RmsNorm

    return [LayerNorm, functools.partial(LayerNorm, eps=1e-5), RmsNorm]


def build(cfg: dict):
    from timm.models.eva import Eva

    try:
        model = Eva(**cfg)
    except (AssertionError, TypeError, ValueError, RuntimeError, AttributeError, ZeroDivisionError):
        return None  # timm refuses (or fails on) this combination itself
    return randomize_(model.eval(), seed=2)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(eva_configs())
def test_every_eva_configuration_reproduces_or_is_refused_by_name(drawn):
    cfg, other_size, traced = drawn
    note(f"config: {cfg}")
    model = build(cfg)
    if model is None:
        event("timm cannot build it")
    assume(model is not None)
    h, w = cfg["img_size"]
    if other_size and cfg["dynamic_img_size"]:
        h, w = h + cfg["patch_size"], w
    images = torch.randn(2, cfg["in_chans"], h, w, generator=torch.Generator().manual_seed(2))
    reproduce_or_refuse(model, images, traced, refused=lambda err: f"refused: {str(err).split('): ', 1)[-1][:60]}",
                        reproduced=lambda hooked: f"reproduced: rotary {hooked.cfg.rotary}, "
                                                  f"{hooked.cfg.rotary_tables} table(s)")


@pytest.mark.parametrize("overrides, feature", [
    (dict(use_post_norm=True), "post-norm"),
    (dict(attn_type="rope", qkv_fused=False, num_kv_heads=1), "grouped-query"),
    (dict(global_pool="avgmax"), "avgmax"),
])
def test_eva_features_still_refused_are_named(overrides, feature):
    model = build(dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, use_rot_pos_emb=True,
                       **overrides))
    assert model is not None
    with pytest.raises(UnsupportedModelError, match=feature):
        px.load(model)
