"""timm's `Eva` family on both backends: EVA-02 (interleaved RoPE, SwiGLU with its inner norm),
DINOv3 (half-layout RoPE with storage/register tokens, layer scale, dynamic sizes), timm's
RoPE ViTs (axial and mixed, learned per-layer frequencies), Perception Encoder (attention pool,
pre-norm) and EVA-01 (absolute positions only). Named configs are shrunk (fewer layers, narrower)
with every flag kept and every parameter randomised."""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from prisma_ext.errors import PrismaError
from prisma_ext.hooked.vit import HookedViT
from tests.support.models import randomize_

NAMED = ["eva02_tiny_patch14_224", "eva02_base_patch14_224", "vit_small_patch16_dinov3",
         "vit_small_patch16_rope_mixed_224", "vit_base_patch16_rope_ape_224", "vit_pe_core_tiny_patch16_384",
         "eva_giant_patch14_224", "vit_small_patch16_dinov3_qkvb"]


def small_eva(name: str, seed: int = 0, **overrides):
    import timm

    patch = 14 if "patch14" in name else 16
    kw = dict(depth=2, embed_dim=32, num_heads=2, num_classes=5, img_size=2 * patch)
    if "mixed" in name:
        kw["depth"] = 3  # one frequency table per layer
    return randomize_(timm.create_model(name, pretrained=False, **{**kw, **overrides}).eval(), seed)


def images_of(model, batch: int = 2, seed: int = 1, size=None):
    h, w = size or model.patch_embed.img_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMED)
def test_named_eva_models_reproduce_on_both_backends(name):
    src = small_eva(name, seed=len(name))
    images = images_of(src)
    hooked, traced = px.load(src), px.load(src, backend="nnsight")  # each checks itself against timm
    with torch.no_grad():
        torch.testing.assert_close(hooked(images), src(images), atol=1e-4, rtol=1e-4)
        _, tl_cache = hooked.run_with_cache(images)
        _, nn_cache = traced.run_with_cache(images)
    assert set(nn_cache) <= set(tl_cache)
    for site, value in nn_cache.items():
        torch.testing.assert_close(value, tl_cache[site], atol=1e-5, rtol=1e-4, msg=site)
    if hooked.cfg.rotary != "none":
        assert "blocks.1.attn.hook_rot_q" in nn_cache and "blocks.1.attn.hook_rot_k" in nn_cache
    torch.testing.assert_close(px.logit_lens(traced, images).values, px.logit_lens(hooked, images).values,
                               atol=1e-5, rtol=1e-4)
    if hooked.readout.is_linear:
        by = ("layer",) if hooked.cfg.attn_norm else ("layer", "head", "source")
        dla = px.direct_logit_attribution(hooked, images, 1, by=by)
        torch.testing.assert_close(px.direct_logit_attribution(traced, images, 1, by=by).values, dla.values,
                                   atol=1e-5, rtol=1e-4)
    patched = px.activation_patching(hooked, images[:1], images[1:], px.LogitDiff(0, 1),
                                     sites=("resid_pre", "z"), progress=False)
    on_nn = px.activation_patching(traced, images[:1], images[1:], px.LogitDiff(0, 1),
                                   sites=("resid_pre", "z"), progress=False)
    for site in patched:
        torch.testing.assert_close(on_nn[site].values, patched[site].values, atol=1e-5, rtol=0)


def test_rotation_leaves_the_prefix_alone_and_an_edit_agrees_across_backends():
    src = small_eva("vit_small_patch16_dinov3", seed=3)  # class token + 4 registers, half layout
    hooked, traced, images = px.load(src), px.load(src, backend="nnsight"), images_of(src)
    n_prefix = hooked.cfg.n_prefix
    assert n_prefix == 5 and hooked.cfg.rotary == "half"
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images)
    q, rot_q = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_rot_q"]
    q_normed = cache["blocks.0.attn.q_norm.hook_normalized"] if hooked.cfg.qk_norm else q
    torch.testing.assert_close(rot_q[:, :n_prefix], q_normed[:, :n_prefix])
    assert (rot_q[:, n_prefix + 1:] - q_normed[:, n_prefix + 1:]).abs().max() > 1e-3  # patches are rotated
    torch.testing.assert_close(rot_q.norm(dim=-1), q_normed.norm(dim=-1), atol=1e-5, rtol=1e-5)  # a rotation

    def zero_patch(t, hook=None):
        t = t.clone()
        t[:, n_prefix + 1] = 0
        return t

    with torch.no_grad():
        expected = hooked.run_with_hooks(images, fwd_hooks=[("blocks.1.attn.hook_rot_k", zero_patch)])
        with traced.trace(images):
            k = traced.site("blocks.1.attn.hook_rot_k")
            k[:, n_prefix + 1] = 0
            edited = traced.output.save()
    assert (expected - hooked(images)).abs().max() > 1e-4
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-4)


def test_the_wrong_pair_layout_or_table_order_would_not_reproduce():
    """What the rotary conversion must get right, shown as the mutations it rules out: the two
    pair layouts differ, and mixed RoPE's per-layer tables are not interchangeable."""
    from prisma_ext.adapters.timm_eva import TimmEvaAdapter

    for name in ("eva02_tiny_patch14_224", "vit_small_patch16_rope_mixed_224"):
        src = small_eva(name, seed=9)
        images = images_of(src)
        adapter = TimmEvaAdapter()
        cfg, weights = adapter.config(src), adapter.weights(src)
        with torch.no_grad():
            want = src(images)
            torch.testing.assert_close(HookedViT.from_weights(cfg, weights)(images), want, atol=1e-4, rtol=1e-4)
            flipped = cfg.replace(rotary="half" if cfg.rotary == "interleaved" else "interleaved")
            assert (HookedViT.from_weights(flipped, weights)(images) - want).abs().max() > 1e-3
            if cfg.rotary_tables > 1:
                weights.rotary.sin, weights.rotary.cos = weights.rotary.sin.flip(0), weights.rotary.cos.flip(0)
                assert (HookedViT.from_weights(cfg, weights)(images) - want).abs().max() > 1e-3


def test_dynamic_sizes_rotate_by_the_images_grid():
    src = small_eva("vit_small_patch16_dinov3", seed=4)
    assert src.dynamic_img_size
    hooked, traced = px.load(src), px.load(src, backend="nnsight")
    images = images_of(src, size=(48, 32))  # a 3 x 2 grid, not the model's 2 x 2
    with torch.no_grad():
        torch.testing.assert_close(hooked(images), src(images), atol=1e-4, rtol=1e-4)
    patched = px.activation_patching(hooked, images[:1], images[1:], px.LogitDiff(0, 1), sites=("z",),
                                     positions="rows", progress=False)
    on_nn = px.activation_patching(traced, images[:1], images[1:], px.LogitDiff(0, 1), sites=("z",),
                                   positions="rows", progress=False)
    torch.testing.assert_close(on_nn["z"].values, patched["z"].values, atol=1e-5, rtol=0)
    assert patched["z"].values.shape[-1] == 3  # one column per patch row of these images


def test_a_fixed_size_rotary_model_refuses_other_grids_by_name():
    src = small_eva("eva02_tiny_patch14_224", seed=5, dynamic_img_size=False)
    hooked = px.load(src)
    with pytest.raises(PrismaError):
        hooked(images_of(src, size=(42, 28)))
    resid = torch.zeros(1, 1 + 6, 32)
    with pytest.raises(PrismaError, match="grid"):
        hooked.embed.rotary((3, 2))
    with pytest.raises(PrismaError, match="grid"):
        hooked.run_from(resid, 0)


def test_tl_names_and_config_of_a_rotary_model():
    hooked = px.load(small_eva("eva02_base_patch14_224", seed=6))  # SwiGLU with its norm before fc2
    names = set(hooked.hook_dict)
    for name in ("blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k", "blocks.0.attn.hook_q",
                 "blocks.0.mlp.hook_pre_linear", "blocks.0.mlp.norm.hook_normalized"):
        assert name in names, name
    assert hooked.cfg.rotary == "interleaved" and hooked.cfg.gated_mlp and hooked.cfg.mlp_norm
    assert hooked.embed.rotary_sin.shape == (1, 4, 1, 16)  # one table for every layer and head: 2 x 2 patches
    assert "hook_rot_q" not in " ".join(px.load(small_eva("eva_giant_patch14_224", seed=6)).hook_dict)


def test_attention_maps_of_a_rotary_model_agree_across_backends():
    """The attention maps read the pattern, which the rotated queries and keys made."""
    src = small_eva("vit_small_patch16_rope_mixed_224", seed=7)
    hooked, traced, images = px.load(src), px.load(src, backend="nnsight"), images_of(src)
    torch.testing.assert_close(px.head_patterns(traced, images).values, px.head_patterns(hooked, images).values,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(px.attention_rollout(traced, images).values,
                               px.attention_rollout(hooked, images).values, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images)
    q, k = cache["blocks.0.attn.hook_rot_q"], cache["blocks.0.attn.hook_rot_k"]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * hooked.cfg.d_head ** -0.5
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"], scores.softmax(-1), atol=1e-5, rtol=1e-5)
