"""The previous release's analysis names work for one more release, each with a DeprecationWarning,
and give what the names that replace them give."""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from tests.support.clip_models import small_open_clip
from tests.support.pairs import classes_for

DEPRECATED = pytest.warns(DeprecationWarning, match="deprecated")


def sweep(model, clean, corrupted, target=None, **kw):
    return px.activation_patching(model, clean, corrupted, target, sites=("resid_pre", "z"), layers=[1],
                                  progress=False, **kw)


def assert_same(a, b):
    assert list(a) == list(b)
    for site in a:
        torch.testing.assert_close(a[site].values, b[site].values, atol=0, rtol=0)


def test_metric_helpers_are_the_targets(analysis_pair):
    p = analysis_pair("plain")
    clean, corrupted = p.images[:2], p.images[1:]
    with DEPRECATED:
        old = px.metrics.logit_diff(3, [5, 6])
    assert isinstance(old, px.LogitDiff)
    assert_same(sweep(p.tl, clean, corrupted, old), sweep(p.tl, clean, corrupted, px.LogitDiff(3, [5, 6])))
    with DEPRECATED:
        prob = px.metrics.target_prob(2)
    assert isinstance(prob, px.ClassProb)
    assert_same(sweep(p.tl, clean, corrupted, prob), sweep(p.tl, clean, corrupted, px.ClassProb(2)))
    with DEPRECATED:
        value = px.metrics.call_metric(lambda out, rows: out[:, 0] + rows, torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(value, torch.tensor([0.0, 1.0, 2.0]))


def test_clip_score_diff_is_an_image_text_score():
    clip = px.load(small_open_clip("ViT-B-16"))
    clean, corrupted = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    prompts = ["a photo of a cat", "a photo of a dog"]
    with torch.no_grad():
        texts = clip.encode_text(prompts)
    with DEPRECATED:
        old = px.metrics.clip_score_diff(texts, clip.logit_scale)
    new = px.ImageTextScore(prompts[:1], versus=prompts[1:])
    got, want = sweep(clip, clean, corrupted, old), sweep(clip, clean, corrupted, new)
    for site in got:
        torch.testing.assert_close(got[site].values, want[site].values, atol=1e-5, rtol=1e-6)


def test_the_metric_argument_is_the_target(analysis_pair):
    p = analysis_pair("plain")
    clean, corrupted = p.images[:2], p.images[1:]
    with DEPRECATED:
        old = sweep(p.tl, clean, corrupted, metric=px.LogitDiff(0, 1))
    assert_same(old, sweep(p.tl, clean, corrupted, px.LogitDiff(0, 1)))
    with DEPRECATED:
        attributed = px.attribution_patching(p.tl, clean, corrupted, metric=px.LogitDiff(0, 1), sites="resid_pre",
                                             progress=False)
    want = px.attribution_patching(p.tl, clean, corrupted, px.LogitDiff(0, 1), sites="resid_pre", progress=False)
    assert_same(attributed, want)
    with pytest.raises(px.errors.InputError, match="once"):
        sweep(p.tl, clean, corrupted, px.LogitDiff(0, 1), metric=px.LogitDiff(0, 1))


def test_faithfulness_in_the_old_order_and_metric_argument(analysis_pair):
    p = analysis_pair("plain")
    classes = classes_for(p)
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    new = px.faithfulness(p.tl, p.images, classes, maps=maps, curves="deletion")
    with DEPRECATED:
        positional = px.faithfulness(p.tl, p.images, maps, classes, curves="deletion")
    with DEPRECATED:
        renamed = px.faithfulness(p.tl, p.images, classes, maps=maps, metric="deletion")
    torch.testing.assert_close(positional.values, new.values, atol=0, rtol=0)
    torch.testing.assert_close(renamed.values, new.values, atol=0, rtol=0)
    with DEPRECATED:
        compared = px.compare_attributions(p.tl, p.images, classes, methods=["random"], metric="deletion")
    assert compared.labels("column") == ["deletion", "seconds"]
    with pytest.raises(px.errors.InputError, match="maps="):
        px.faithfulness(p.tl, p.images, classes)


def test_viz_heads_computations_moved_to_analysis(analysis_pair):
    from prisma_ext.viz import heads

    p = analysis_pair("dinov2_reg4")
    new = px.head_patterns(p.tl, p.images)
    with DEPRECATED:
        old = heads.head_patterns(p.tl, p.images)
    torch.testing.assert_close(old, new.values, atol=0, rtol=0)
    with DEPRECATED:
        table = heads.head_stats(old, p.tl.layout)
    assert table.equals(px.head_statistics(new).to_dataframe())
    with DEPRECATED:
        readout = heads.readout_attention(p.tl, p.images, old)
    torch.testing.assert_close(readout, px.readout_attention(p.tl, p.images, patterns=new).values)
