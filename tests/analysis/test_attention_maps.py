"""Attention rollout and gradient-weighted attention: reference values, layouts, both backends."""

import pytest
import torch

import prisma_ext as px
from prisma_ext.errors import InputError
from tests.support.pairs import LINEAR, PREFIX, SAME, classes_for


def _reference_rollout(model, images, fusion="mean", rows=0):
    """Rollout from TL's cache, written out plainly: the CLS row (or `rows`), patch columns."""
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    n = model.layout.n_tokens
    result = torch.eye(n).expand(images.shape[0], n, n)
    for i in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{i}.attn.hook_pattern"]
        fused = pattern.mean(1) if fusion == "mean" else pattern.max(1).values
        a = 0.5 * fused + 0.5 * torch.eye(n)
        result = (a / a.sum(-1, keepdim=True)) @ result
    return result[:, rows, model.layout.n_prefix:]


def _reference_chefer(model, images, classes):
    """Chefer et al.'s relevance from plain autograd on the hooked model, CLS row, patch columns."""
    patterns = {}

    def keep(pattern, hook):
        pattern.retain_grad()
        patterns[hook.name] = pattern
        return pattern

    logits = model.run_with_hooks(images, fwd_hooks=[(lambda name: name.endswith("hook_pattern"), keep)])
    logits[torch.arange(images.shape[0]), classes].sum().backward()
    n = model.layout.n_tokens
    relevance = torch.eye(n).expand(images.shape[0], n, n)
    for i in range(model.cfg.n_layers):
        p = patterns[f"blocks.{i}.attn.hook_pattern"]
        cam = (p.grad * p.detach()).clamp(min=0).mean(1)
        relevance = relevance + cam @ relevance
    return relevance[:, 0, model.layout.n_prefix:]


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_rollout_matches_a_plain_reference(fusion, analysis_pair):
    p = analysis_pair("plain")
    got = px.attention_rollout(p.tl, p.images, head_fusion=fusion)
    torch.testing.assert_close(got.values, _reference_rollout(p.tl, p.images, fusion), atol=1e-6, rtol=0)
    assert got.dims == ("batch", "patch") and got.grid().shape == (3, 4, 4)


def test_gradient_attention_matches_plain_autograd(analysis_pair):
    p = analysis_pair("plain")
    classes = classes_for(p)
    fresh = px.load(p.src)
    expected = _reference_chefer(fresh, p.images, classes)
    got = px.gradient_attention(p.tl, p.images, classes)
    torch.testing.assert_close(got.values, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", PREFIX + ["siglip_map"])
def test_maps_have_the_grid_shape_on_prefix_layouts(variant, analysis_pair):
    p = analysis_pair(variant)
    for model in (p.tl, p.nn):
        for result in (px.attention_rollout(model, p.images), px.gradient_attention(model, p.images)):
            assert result.grid().shape == (3, *p.tl.layout.grid)
            assert torch.isfinite(result.values).all()
            assert result.labels("patch")[0] == "p0_0"


@pytest.mark.parametrize("variant", LINEAR + ["siglip_map"])
def test_attention_maps_same_on_both_backends(variant, analysis_pair):
    p = analysis_pair(variant)
    classes = classes_for(p)
    for method in (lambda m: px.attention_rollout(m, p.images, head_fusion="min", discard_ratio=0.2),
                   lambda m: px.gradient_attention(m, p.images, classes),
                   lambda m: px.gradient_attention(m, p.images, px.LogitDiff(0, 1), start_layer=1)):
        torch.testing.assert_close(method(p.tl).values, method(p.nn).values, **SAME)


def test_rollout_reads_the_pooled_row_and_drops_prefix_columns(analysis_pair):
    # registers carry flow but get no map entry; the CLS row over all tokens sums to 1
    p = analysis_pair("dinov2_reg4")
    rollout = px.attention_rollout(p.tl, p.images)
    assert rollout.values.shape == (3, p.tl.layout.n_patches)
    assert (rollout.values >= 0).all() and (rollout.values.sum(-1) < 1).all()
    # an average-pool model's map is the mean of the patch rows
    g = analysis_pair("gap_no_cls")
    full = _reference_rollout(g.tl, g.images, rows=slice(None))
    torch.testing.assert_close(px.attention_rollout(g.nn, g.images).values, full.mean(1), atol=1e-6, rtol=0)
    # discarding all but the diagonal leaves the identity: each patch 1/n_patches
    ident = px.attention_rollout(g.tl, g.images, discard_ratio=0.99)
    torch.testing.assert_close(ident.values, torch.full((3, 16), 1 / 16), atol=1e-6, rtol=0)


def test_bad_arguments_are_named(analysis_pair):
    p = analysis_pair("plain")
    with pytest.raises(InputError, match="head_fusion"):
        px.attention_rollout(p.tl, p.images, head_fusion="median")
    with pytest.raises(InputError, match="discard_ratio"):
        px.attention_rollout(p.tl, p.images, discard_ratio=1.0)
    with pytest.raises(InputError, match="start_layer"):
        px.gradient_attention(p.tl, p.images, start_layer=2)
    with pytest.raises(InputError, match="one score per image"):
        px.gradient_attention(p.tl, p.images, lambda out: out.sum())
