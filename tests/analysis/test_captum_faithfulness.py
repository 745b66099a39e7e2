"""Captum baselines on the patch grid, faithfulness metrics, the comparison table, and cleanup."""

import functools

import pytest
import torch

import prisma_ext as px
from prisma_ext.analysis.captum_attr import METHODS
from prisma_ext.analysis.compare import DEFAULT_METHODS, _applicable
from prisma_ext.analysis.targets import ClassTarget
from prisma_ext.errors import InputError
from tests.support.clip_models import small_open_clip, text_tokens_for
from tests.support.models import fused_flags, module_hooks
from tests.support.pairs import PREFIX, SAME, classes_for
from tests.support.trained import trained_shapes_vit

N_TRAINED = 32
CHEAP = {"integrated_gradients": dict(n_steps=20), "noise_tunnel": dict(nt_samples=3, n_steps=8),
         "gradient_shap": dict(n_samples=6)}


@pytest.fixture(scope="module")
def trained():
    t = trained_shapes_vit()
    return t, px.load(t.model)


# ---------------------------------------------------------------- Captum
def _completeness(model, images, target, expected_gap, scale):
    """IG: patch sums + Captum's delta give f(x) - f(0) exactly; |delta| is small for 200 steps."""
    ig = px.captum_attribution(model, images, target, method="IntegratedGradients", n_steps=200)
    delta = ig.meta["delta"]
    torch.testing.assert_close(ig.values.sum(-1) - delta, expected_gap, atol=1e-4, rtol=1e-4)
    assert delta.abs().max() <= 0.02 * scale, (delta, scale)


def test_integrated_gradients_completeness_on_the_trained_model(trained):
    t, model = trained
    images, labels = t.images[:4], t.labels[:4]
    with torch.no_grad():
        logits = t.model(images)
        at_zero = t.model(torch.zeros_like(images))
    gap = logits[torch.arange(4), labels] - at_zero[torch.arange(4), labels]
    _completeness(model, images, labels, gap, scale=logits.abs().max())


def test_integrated_gradients_completeness_for_a_clip_image_text_score():
    clip = px.load(small_open_clip("ViT-B-16"))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = text_tokens_for(clip.text.cfg, batch=2)
    with torch.no_grad():
        score = clip.image_text_score(images, tokens)
        gap = score - clip.image_text_score(torch.zeros_like(images), tokens)
    _completeness(clip, images, px.ImageTextScore(tokens), gap, scale=score.abs().max())
    saliency = px.captum_attribution(clip, images, px.ImageTextScore(tokens[:1]), method="saliency")
    chefer = px.gradient_attention(clip, images, px.ImageTextScore(tokens))
    for result in (saliency, chefer):
        assert result.grid().shape == (2, 4, 4) and result.values.abs().sum() > 0
    scores = px.faithfulness(clip, images, px.ImageTextScore(tokens), maps=chefer, curves="deletion")
    torch.testing.assert_close(scores.part("curves").values[:, 0, 0], score)  # nothing removed yet


@pytest.mark.parametrize("variant", ["plain", *PREFIX])
def test_every_captum_method_on_the_grid_and_same_on_both_backends(variant, analysis_pair):
    p = analysis_pair(variant, batch=2)
    classes = classes_for(p)
    for method in METHODS:
        a = px.captum_attribution(p.tl, p.images, classes, method=method, **CHEAP.get(method, {}))
        b = px.captum_attribution(p.nn, p.images, classes, method=method, **CHEAP.get(method, {}))
        assert a.grid().shape == (2, *p.tl.layout.grid), method
        assert a.values.abs().sum() > 0, method
        torch.testing.assert_close(a.values, b.values, **SAME, msg=method)


def test_ablation_and_occlusion_give_each_patch_its_effect(analysis_pair):
    p = analysis_pair("dinov2_reg4", batch=2)
    classes = classes_for(p)
    ablation = px.captum_attribution(p.tl, p.images, classes, method="FeatureAblation")
    occlusion = px.captum_attribution(p.tl, p.images, classes, method="occlusion")
    torch.testing.assert_close(ablation.values, occlusion.values, atol=1e-6, rtol=0)
    patched = p.images.clone()
    patched[..., 14:28, 0:14] = 0  # patch (1, 0): index 3 on the 3x3 grid
    with torch.no_grad():
        drop = p.src(p.images) - p.src(patched)
    torch.testing.assert_close(ablation.values[:, 3], drop[torch.arange(2), classes], atol=1e-5, rtol=0)


def test_captum_with_logit_difference_and_random_methods_are_seeded(analysis_pair):
    p = analysis_pair("plain", batch=2)
    diff = px.LogitDiff([1, 2], 0)
    one = px.captum_attribution(p.tl, p.images, diff, method="gradient_shap")
    two = px.captum_attribution(p.tl, p.images, diff, method="gradient_shap")
    torch.testing.assert_close(one.values, two.values)
    other = px.captum_attribution(p.tl, p.images, diff, method="gradient_shap", seed=1)
    assert not torch.equal(one.values, other.values)
    with pytest.raises(InputError, match="closest"):
        px.captum_attribution(p.tl, p.images, 0, method="integrated_gradient_x")


# ---------------------------------------------------------------- faithfulness
def test_faithfulness_curve_ends_are_the_clean_and_baseline_scores(analysis_pair):
    p = analysis_pair("plain")
    classes = classes_for(p)
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    result = px.faithfulness(p.tl, p.images, classes, maps=maps)
    curves = result.part("curves")
    assert result.labels("metric") == ["deletion", "insertion", "pos_perturbation", "neg_perturbation"]
    assert curves.coords["step"][0] == 0.0 and curves.coords["step"][-1] == 1.0
    rows = torch.arange(3)
    with torch.no_grad():
        clean = p.src(p.images).softmax(-1)[rows, classes]
        empty = p.src(torch.zeros_like(p.images)).softmax(-1)[rows, classes]
    deletion, insertion = curves.values[:, 0], curves.values[:, 1]
    torch.testing.assert_close(deletion[:, 0], clean)
    torch.testing.assert_close(deletion[:, -1], empty)
    torch.testing.assert_close(insertion[:, 0], empty)
    torch.testing.assert_close(insertion[:, -1], clean)
    x = torch.tensor(curves.coords["step"])
    torch.testing.assert_close(result.values[:, 0], torch.trapezoid(deletion, x))


def test_every_curve_point_is_its_own_perturbed_image_scored_directly(analysis_pair):
    """Each distinct perturbed image is scored once (the curves' ends and insertion images that
    equal deletion images are shared): every point still equals the source model's score of the
    image built naively, patch by patch, for deletion (remove the top-ranked patches) and
    insertion (reveal them on the baseline)."""
    p = analysis_pair("plain")
    classes = classes_for(p)
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(3))
    steps = 4
    curves = px.faithfulness(p.tl, p.images, classes, maps=maps, curves=("deletion", "insertion"),
                             n_steps=steps).part("curves").values
    patch = p.images.shape[-1] // 4
    for b in range(3):
        order = torch.sort(maps[b].flatten(), descending=True, stable=True).indices
        for s, count in enumerate(torch.round(torch.arange(steps + 1) * 16 / steps).long().tolist()):
            top = torch.zeros(16, dtype=torch.bool)
            top[order[:count]] = True
            mask = top.view(4, 4).repeat_interleave(patch, 0).repeat_interleave(patch, 1).float()
            removed = p.images[b] * (1 - mask)  # the baseline is zeros
            revealed = p.images[b] * mask
            with torch.no_grad():
                want = p.src(torch.stack([removed, revealed])).softmax(-1)[:, classes[b]]
            torch.testing.assert_close(curves[b, :, s], want, atol=1e-5, rtol=1e-4)


def test_the_same_perturbed_image_is_scored_once():
    from prisma_ext.analysis.faithfulness import _distinct_images

    ranks = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(6)])
    ranks = ranks.view(3, 2, 16)  # 3 runs (deletion, insertion, deletion of another map), 2 images
    inserts = torch.tensor([False, True, False])
    counts = torch.tensor([0, 4, 8, 12, 16])
    example, replaced, inverse = _distinct_images(ranks, inserts, counts)
    naive = torch.stack([torch.where(inserts[r], ~(ranks[r, b] < c), ranks[r, b] < c)
                         for r in range(3) for b in range(2) for c in counts])
    torch.testing.assert_close(replaced[inverse], naive)
    torch.testing.assert_close(example[inverse], torch.arange(2).repeat_interleave(5).repeat(3))
    assert len(example) == 2 * 2 + 3 * 2 * 3  # per image: nothing and everything replaced, once


def test_faithfulness_same_on_both_backends_and_takes_results(analysis_pair):
    p = analysis_pair("dinov2_reg4")
    rollout = px.attention_rollout(p.tl, p.images)
    a = px.faithfulness(p.tl, p.images, maps=rollout, baseline="blur")
    b = px.faithfulness(p.nn, p.images, maps=rollout.grid(), baseline="blur")
    torch.testing.assert_close(a.values, b.values, **SAME)
    c = px.faithfulness(p.tl, p.images, maps=rollout.values, curves="deletion", n_steps=3, baseline="mean",
                        batch_size=5)
    assert c.shape == (3, 1) and len(c.part("curves").coords["step"]) == 4


def test_faithfulness_names_bad_maps(analysis_pair):
    p = analysis_pair("plain")
    with pytest.raises(InputError, match=r"expected \[batch, rows, cols\] = \[3, 4, 4\]"):
        px.faithfulness(p.tl, p.images, maps=torch.rand(3, 3, 3))
    with pytest.raises(InputError, match="NaN"):
        px.faithfulness(p.tl, p.images, maps=torch.full((3, 16), float("nan")))
    with pytest.raises(InputError, match="unknown metric"):
        px.faithfulness(p.tl, p.images, maps=torch.rand(3, 16), curves="pointing")
    with pytest.raises(InputError, match="baseline"):
        px.faithfulness(p.tl, p.images, maps=torch.rand(3, 16), baseline="noise")
    with pytest.raises(InputError, match="needs a class target"):
        px.faithfulness(p.tl, p.images, px.LogitDiff(0, 1), maps=torch.rand(3, 16), score="prob")


def test_random_maps_delete_worse_than_gradient_maps_on_the_trained_model(trained):
    t, model = trained
    images, labels = t.images[:N_TRAINED], t.labels[:N_TRAINED]
    methods = ["gradient_attention", ("integrated_gradients", {"n_steps": 20}), "saliency", "cls_attribution",
               "random"]
    compared = px.compare_attributions(model, images, labels, methods=methods, n_steps=8)
    table = compared.to_dataframe().set_index("method")
    assert list(table.columns) == ["deletion", "insertion", "seconds"]
    random = table.loc["random"]
    for method in ["gradient_attention", "integrated_gradients", "saliency", "cls_attribution"]:
        assert table.loc[method, "deletion"] < random["deletion"] - 0.05, table
        assert table.loc[method, "insertion"] > random["insertion"], table
    # and they point at the shape: the top patch overlaps its mask
    (rows, cols), (ph, pw) = model.layout.grid, model.layout.patch_size
    masks = t.masks[:N_TRAINED].reshape(N_TRAINED, rows, ph, cols, pw).any(4).any(2).flatten(1)
    for method in ("gradient_attention", "integrated_gradients"):
        top = compared.part(method).values.argmax(-1)
        assert masks[torch.arange(N_TRAINED), top].float().mean() >= 0.8, method


def test_default_methods_are_those_that_apply(analysis_pair):
    p = analysis_pair("plain", batch=2)
    from prisma_ext.analysis.backend import Backend
    from prisma_ext.analysis.targets import FunctionTarget

    backend = Backend.of(p.tl)
    assert _applicable(backend, ClassTarget(0)) == DEFAULT_METHODS
    assert "cls_attribution" not in _applicable(backend, FunctionTarget(lambda out: out[:, 0]))
    siglip = Backend.of(analysis_pair("siglip_map", batch=2).tl)
    assert "cls_attribution" not in _applicable(siglip, ClassTarget(0))


def test_compare_attributions_same_on_both_backends(analysis_pair):
    p = analysis_pair("gap_no_cls", batch=2)
    methods = [(name, CHEAP.get(name, {})) for name in DEFAULT_METHODS]
    a = px.compare_attributions(p.tl, p.images, methods=methods, curves=("deletion", "insertion", "perturbation"))
    b = px.compare_attributions(p.nn, p.images, methods=methods, curves=("deletion", "insertion", "perturbation"))
    assert a.labels("method") == b.labels("method") == list(DEFAULT_METHODS)
    assert a.labels("column") == ["deletion", "insertion", "pos_perturbation", "neg_perturbation", "seconds"]
    torch.testing.assert_close(a.values[:, :-1], b.values[:, :-1], **SAME)
    assert (a.values[:, -1] >= 0).all()
    custom = px.compare_attributions(p.tl, p.images, methods=[("ig20", lambda m, x, t: px.captum_attribution(
        m, x, t, n_steps=20)), ("attention_rollout", {"head_fusion": "max"})])
    assert custom.labels("method") == ["ig20", "attention_rollout"]
    assert len(custom.plot().data) == 3


# ---------------------------------------------------------------- nothing left behind
class _Boom(ClassTarget):
    def table(self, output, acts):
        raise RuntimeError("boom")


CALLS = {
    "logit_lens": lambda m, x, t: px.logit_lens(m, x),
    "direct_logit_attribution": lambda m, x, t: px.direct_logit_attribution(m, x, t),
    "attention_rollout": lambda m, x, t: px.attention_rollout(m, x),
    "gradient_attention": lambda m, x, t: px.gradient_attention(m, x, t),
    "faithfulness": lambda m, x, t: px.faithfulness(m, x, t, maps=torch.rand(x.shape[0], 9)),
    **{f"captum/{name}": functools.partial(lambda m, x, t, method: px.captum_attribution(m, x, t, method=method),
                                           method=name) for name in METHODS},
}


@pytest.mark.parametrize("call", CALLS)
def test_no_hooks_or_flags_left_even_after_an_error(call, analysis_pair):
    p = analysis_pair("dinov2_reg4", batch=2)
    flags = fused_flags(p.src)
    nan_images = p.images.clone()
    nan_images[0, 0, 0, 0] = float("nan")
    for model in (p.tl, p.nn):
        with pytest.raises((RuntimeError, InputError)):
            CALLS[call](model, p.images, _Boom(0))
            CALLS[call](model, nan_images, 0)  # the methods that never read the target
        assert module_hooks(p.tl) == {} and module_hooks(p.src) == {}, call
        assert fused_flags(p.src) == flags
        with pytest.raises(InputError):
            CALLS[call](model, nan_images, 0)
        assert module_hooks(p.tl) == {} and module_hooks(p.src) == {}, call
        assert fused_flags(p.src) == flags


def test_a_block_feature_mask_gives_each_block_of_patches_one_id():
    """Feature ablation of K x K patch blocks: every pixel of a block shares one id, blocks are
    numbered row by row, the last row and column of blocks narrower (a transposed or mirrored
    numbering, or blocks that straddle a row of blocks, fail)."""
    from prisma_ext.analysis.captum_attr import patch_feature_mask
    from prisma_ext.layout import TokenLayout

    layout = TokenLayout(1, 0, 0, (4, 5), (2, 2), (8, 10))
    mask = patch_feature_mask(layout, 3, block=3)
    assert mask.shape == (1, 3, 8, 10) and torch.equal(mask[0, 0], mask[0, 2])
    per_patch = mask[0, 0, ::2, ::2]
    torch.testing.assert_close(per_patch, torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1],
                                                        [2, 2, 2, 3, 3]]))
    torch.testing.assert_close(patch_feature_mask(layout, 1, block=1)[0, 0, ::2, ::2],
                               torch.arange(20).reshape(4, 5))


def test_grad_cam_beats_the_random_map_on_the_trained_model(trained):
    """Grad-CAM on the last block's normalised input with its ReLU (the default) orders patches
    better than chance on both curves; on the raw residual stream (hook_resid_pre, the previous
    default) its insertion was worse than the random map's (docs/zoo.md: 0.405 vs 0.474)."""
    t, model = trained
    images, labels = t.images[:16], t.labels[:16]
    compared = px.compare_attributions(model, images, labels, methods=["layer_gradcam", "random"], n_steps=8,
                                       baseline="mean")
    table = compared.to_dataframe().set_index("method")
    assert table.loc["layer_gradcam", "insertion"] > table.loc["random", "insertion"], table
    assert table.loc["layer_gradcam", "deletion"] < table.loc["random", "deletion"], table
