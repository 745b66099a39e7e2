"""The architecture features of today's timm ViTs on the hooked model, with TL's names: RMSNorm,
gated MLPs (SwiGLU, packed GLU), a norm inside the MLP and inside attention (timm's scale norms),
qk-norm, a norm inside the patch embedding (AIMv2). Each reproduces timm (px.load checks it; the
nnsight backend's every site is compared with the TL model's at load), and the analysis layer's
identities hold through them."""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from prisma_ext.errors import PrismaError
from tests.support.models import images_for, randomize_

SMALL = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, num_classes=5)


def build(**overrides):
    from timm.models.vision_transformer import VisionTransformer

    return randomize_(VisionTransformer(**{**SMALL, **overrides}).eval(), seed=4)


def features():
    from timm.layers import GluMlp, SwiGLU, SwiGLUPacked

    return {
        "rmsnorm": dict(norm_layer="rmsnorm"),
        "swiglu": dict(mlp_layer=SwiGLU, act_layer="silu"),
        "glu_packed": dict(mlp_layer=GluMlp, act_layer="sigmoid"),
        "swiglu_packed": dict(mlp_layer=SwiGLUPacked),
        "qk_norm": dict(qk_norm=True),
        "scale_norms": dict(scale_attn_norm=True, scale_mlp_norm=True),
        "aimv2_like": dict(embed_norm_layer="rmsnorm", norm_layer="rmsnorm", mlp_layer=SwiGLU, qkv_bias=False,
                           proj_bias=False, class_token=False, global_pool="avg"),
        "eva02_like_mlp": dict(mlp_layer=SwiGLU, scale_mlp_norm=True, qk_norm=True, init_values=0.5),
    }


@pytest.mark.parametrize("name", list(features()))
def test_each_feature_reproduces_on_both_backends(name):
    src = build(**features()[name])
    images = images_for(src, batch=2, size=(16, 16))
    hooked, traced = px.load(src), px.load(src, backend="nnsight")
    with torch.no_grad():
        torch.testing.assert_close(hooked(images), src(images), atol=1e-4, rtol=1e-4)
    lens_tl, lens_nn = px.logit_lens(hooked, images), px.logit_lens(traced, images)
    torch.testing.assert_close(lens_nn.values, lens_tl.values, atol=1e-5, rtol=1e-4)
    by = ("layer",) if hooked.cfg.attn_norm else ("layer", "head", "source")
    dla = px.direct_logit_attribution(hooked, images, 1, by=by)
    torch.testing.assert_close(px.direct_logit_attribution(traced, images, 1, by=by).values, dla.values,
                               atol=1e-5, rtol=1e-4)
    patched = px.activation_patching(hooked, images[:1], images[1:], px.LogitDiff(0, 1), sites=("mlp_out", "z"),
                                     progress=False)
    on_nn = px.activation_patching(traced, images[:1], images[1:], px.LogitDiff(0, 1), sites=("mlp_out", "z"),
                                   progress=False)
    for site in patched:
        torch.testing.assert_close(on_nn[site].values, patched[site].values, atol=1e-5, rtol=0)


def test_tl_names_of_the_new_sites():
    from timm.layers import SwiGLU

    hooked = px.load(build(mlp_layer=SwiGLU, qk_norm=True, scale_attn_norm=True, scale_mlp_norm=True,
                           embed_norm_layer="layernorm"))
    names = set(hooked.hook_dict)
    for name in ("blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_pre_linear", "blocks.0.mlp.hook_post",
                 "blocks.0.mlp.norm.hook_normalized", "blocks.0.attn.q_norm.hook_normalized",
                 "blocks.0.attn.k_norm.hook_normalized", "blocks.0.attn.norm.hook_normalized",
                 "embed.norm.hook_normalized", "blocks.1.attn.q_norm.hook_scale"):
        assert name in names, name
    assert hooked.blocks[0].mlp.W_gate.shape == (24, hooked.cfg.d_mlp)
    rms = px.load(build(norm_layer="rmsnorm"))
    assert rms.cfg.normalization_type == "RMS" and rms.cfg.final_rms
    assert px.load(build(norm_layer="rmsnorm"), fold_ln=True).cfg.normalization_type == "RMSPre"


def test_processing_options_say_what_a_feature_rules_out():
    images = torch.randn(2, 3, 16, 16)
    rms = build(norm_layer="rmsnorm")
    with torch.no_grad():
        torch.testing.assert_close(px.load(rms, fold_ln=True)(images), rms(images), atol=1e-4, rtol=1e-4)
    with pytest.raises(PrismaError, match="center_writing_weights.*RMSNorm"):
        px.load(rms, center_writing_weights=True)
    scaled = build(scale_attn_norm=True)
    for option in ("fold_value_biases", "use_attn_result"):
        with pytest.raises(PrismaError, match=f"{option} needs each head's output"):
            px.load(scaled, **{option: True})
    with pytest.raises(PrismaError, match="by head: this model normalises the heads' outputs"):
        px.direct_logit_attribution(px.load(scaled), images)
