"""Patch logit lens and direct logit attribution: exact identities, every layout, both backends."""

import pytest
import torch

import prisma_ext as px
from prisma_ext.errors import InputError, PrismaError
from tests.support.clip_models import small_open_clip, text_tokens_for
from tests.support.models import images_for, small_timm
from tests.support.pairs import LINEAR, PREFIX, SAME, classes_for

ATOL = 1e-4


# ---------------------------------------------------------------- logit lens
@pytest.mark.parametrize("variant", LINEAR + ["siglip_map"])
def test_lens_last_layer_pooled_readout_is_the_logits(variant, analysis_pair):
    p = analysis_pair(variant)
    for model in (p.tl, p.nn):
        lens = px.logit_lens(model, p.images)
        n_layers, layout = p.tl.cfg.n_layers, p.tl.layout
        assert lens.dims == ("batch", "layer", "token", "class")
        assert lens.shape == (3, n_layers + 1, layout.n_tokens, p.logits.shape[-1])
        torch.testing.assert_close(lens.part("pooled").values[:, -1], p.logits, atol=ATOL, rtol=0)
        assert lens.grid().shape == (3, n_layers + 1, p.logits.shape[-1], *layout.grid)
        if variant in ("plain", "dinov2_reg4", "clip_norm_pre"):  # one CLS token: its own readout
            torch.testing.assert_close(lens.values[:, -1, 0], p.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["gap_no_cls", "avg_fc_norm"])
def test_lens_of_an_average_pool_model_pools_before_the_norm(variant, analysis_pair):
    # the pooled readout is norm(mean of tokens) or mean(norm of tokens), as the model does it;
    # the mean of the per-token readouts is not the logits when the norm follows the pool
    p = analysis_pair(variant)
    lens = px.logit_lens(p.tl, p.images)
    mean_of_tokens = lens.values[:, -1].mean(1)
    if variant == "gap_no_cls":  # norm on every token, then a linear head: the mean commutes
        torch.testing.assert_close(mean_of_tokens, p.logits, atol=ATOL, rtol=0)
    else:
        assert (mean_of_tokens - p.logits).abs().max() > 1e-3


@pytest.mark.parametrize("variant", LINEAR)
def test_lens_same_on_both_backends(variant, analysis_pair):
    p = analysis_pair(variant)
    a, b = px.logit_lens(p.tl, p.images), px.logit_lens(p.nn, p.images)
    torch.testing.assert_close(a.values, b.values, **SAME)
    torch.testing.assert_close(a.part("pooled").values, b.part("pooled").values, **SAME)


def test_lens_class_subset_summary_and_top_k(analysis_pair):
    p = analysis_pair("plain")
    full = px.logit_lens(p.tl, p.images)
    sub = px.logit_lens(p.tl, p.images, classes=[4, 1])
    torch.testing.assert_close(sub.values, full.values[..., [4, 1]])
    assert sub.labels("class") == [4, 1]
    summary = full.summary()
    assert list(summary.columns) == ["layer", "accuracy", "mean_rank", "patch_top1"]
    assert summary["layer"].tolist() == ["embed", "L0", "L1"]
    assert summary["accuracy"].iloc[-1] == 1.0 and summary["mean_rank"].iloc[-1] == 0.0
    by_class = full.summary(target=torch.tensor([0, 3, 6]))
    assert (by_class["mean_rank"] >= 0).all()
    sub_summary = sub.summary(target=1)  # class 1 sits second on the subset's axis
    pooled = sub.part("pooled").values[:, :, 1]
    assert sub_summary["accuracy"].tolist() == (pooled > sub.part("pooled").values[:, :, 0]).float().mean(0).tolist()
    with pytest.raises(InputError, match="not among"):
        sub.summary(target=2)
    labels = full.top_k(2, layer=-1)
    assert len(labels) == 4 and len(labels[0]) == 4 and labels[0][0].count(",") == 1
    fig = full.plot()
    assert len(fig.data) == p.tl.cfg.n_layers + 1


def test_lens_with_processed_weights_matches_unprocessed(analysis_pair):
    p = analysis_pair("plain")
    folded = px.load(p.src, fold_ln=True, center_writing_weights=True)
    torch.testing.assert_close(px.logit_lens(folded, p.images).values, px.logit_lens(p.tl, p.images).values,
                               atol=ATOL, rtol=0)


# ---------------------------------------------------------------- direct logit attribution
@pytest.mark.parametrize("variant", LINEAR)
@pytest.mark.parametrize("by", [("layer",), ("layer", "head"), ("layer", "head", "source")])
def test_dla_components_sum_to_the_logit(variant, by, analysis_pair):
    p = analysis_pair(variant)
    classes = classes_for(p)
    dla = px.direct_logit_attribution(p.tl, p.images, classes, by=by)
    expected = p.logits[torch.arange(3), classes]
    torch.testing.assert_close(dla.values.sum(-1), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(dla.meta["score"], expected, atol=ATOL, rtol=0)
    labels = dla.labels("component")
    assert labels[0] == "embed" and labels[-1] == "bias" and "L1.mlp" in labels
    if "head" in by:
        heads = dla.part("head").values
        assert heads.shape == (3, p.tl.cfg.n_layers, p.tl.cfg.n_heads)
        assert "L0H2" in labels and "L1.attn_bias" in labels
        torch.testing.assert_close(heads[:, 1, 2], dla.values[:, labels.index("L1H2")])
    if "source" in by:
        source = dla.part("source")
        assert source.dims == ("batch", "layer", "head", "token")
        torch.testing.assert_close(source.values.sum(-1), dla.part("head").values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", LINEAR)
@pytest.mark.parametrize("fold_ln", [False, True])
def test_class_directions_give_the_logits(variant, fold_ln, analysis_pair):
    """The one readout's per-image class directions, dotted with the normalised final residual
    stream, give the model's logits (computed here by hand, not by the readout)."""
    p = analysis_pair(variant)
    model = px.load(p.src, fold_ln=fold_ln)
    ids = torch.tensor([0, 3, 6])
    with torch.no_grad():
        logits, cache = model.run_with_cache(p.images)
        final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
        directions, const = model.readout.class_directions(ids, final.shape[1])
        centred = final - final.mean(-1, keepdim=True)
        if model.cfg.final_norm == "pooled":  # the norm reads the average-pooled vector
            start = model.cfg.n_prefix
            pooled = final[:, start:].mean(1, keepdim=True)
            scale = (pooled.var(-1, unbiased=False, keepdim=True) + model.cfg.eps_final).sqrt()
        else:
            scale = (final.var(-1, unbiased=False, keepdim=True) + model.cfg.eps_final).sqrt()
        got = ((centred / scale) * directions).sum((-1, -2)) + const
    torch.testing.assert_close(got, logits[torch.arange(3), ids], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.token_readout(ids)[0], directions)


@pytest.mark.parametrize("variant", LINEAR)
def test_dla_same_on_both_backends(variant, analysis_pair):
    p = analysis_pair(variant)
    classes = classes_for(p)
    a = px.direct_logit_attribution(p.tl, p.images, classes)
    b = px.direct_logit_attribution(p.nn, p.images, classes)
    assert a.labels("component") == b.labels("component")
    torch.testing.assert_close(a.values, b.values, **SAME)
    torch.testing.assert_close(a.part("source").values, b.part("source").values, **SAME)


def test_dla_head_split_matches_tl_per_head_results(analysis_pair):
    # an independent route: TL's stacked head results with use_attn_result, at the CLS position
    p = analysis_pair("plain")
    model = px.load(p.src, use_attn_result=True)
    classes = classes_for(p)
    with torch.no_grad():
        _, cache = model.run_with_cache(p.images)
    scale = cache["ln_final.hook_scale"][:, 0]  # [batch, 1]
    dirs = model.tokens_to_residual_directions(classes)  # [batch, d]
    dirs = dirs - dirs.mean(-1, keepdim=True)
    for layer in range(model.cfg.n_layers):
        result = cache[f"blocks.{layer}.attn.hook_result"][:, 0]  # [batch, head, d]
        expected = torch.einsum("bhd,bd->bh", result, dirs) / scale
        got = px.direct_logit_attribution(p.tl, p.images, classes).part("head").values[:, layer]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", PREFIX)
def test_cls_attribution_maps_have_the_grid_shape(variant, analysis_pair):
    p = analysis_pair(variant)
    source = px.direct_logit_attribution(p.nn, p.images, classes_for(p)).part("source")
    assert source.grid().shape == (3, p.tl.cfg.n_layers, p.tl.cfg.n_heads, *p.tl.layout.grid)


def test_dla_logit_difference(analysis_pair):
    p = analysis_pair("dinov2_reg4")
    dla = px.direct_logit_attribution(p.tl, p.images, px.LogitDiff(2, [0, 1, 5]))
    expected = p.logits[:, 2] - p.logits[torch.arange(3), torch.tensor([0, 1, 5])]
    torch.testing.assert_close(dla.values.sum(-1), expected, atol=ATOL, rtol=0)


def test_dla_default_target_is_the_predicted_class_and_names_work(analysis_pair):
    p = analysis_pair("plain")
    dla = px.direct_logit_attribution(p.tl, p.images)
    torch.testing.assert_close(dla.values.sum(-1), p.logits.max(-1).values, atol=ATOL, rtol=0)
    model = px.load(p.src)
    model.class_names = [f"class{i}" for i in range(7)]
    named = px.direct_logit_attribution(model, p.images, "class3")
    torch.testing.assert_close(named.values.sum(-1), p.logits[:, 3], atol=ATOL, rtol=0)
    frame = named.to_dataframe()
    assert set(frame.columns) == {"batch", "component", "value"} and "L0H1" in set(frame["component"])


def test_dla_of_clip_image_text_score_and_zero_shot_class():
    src = small_open_clip("ViT-B-32")
    clip = px.load(src)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = text_tokens_for(clip.text.cfg, batch=2)
    with torch.no_grad():
        expected = clip.image_text_score(images, tokens)
    dla = px.direct_logit_attribution(clip, images, px.ImageTextScore(tokens))
    torch.testing.assert_close(dla.values.sum(-1), expected, atol=ATOL, rtol=0)
    assert "image embedding norm" in dla.meta["frozen"]
    one = px.direct_logit_attribution(clip, images, px.ImageTextScore(tokens[:1]))
    with torch.no_grad():
        torch.testing.assert_close(one.values.sum(-1), clip(images, tokens[:1])[:, 0], atol=ATOL, rtol=0)
    with pytest.raises(PrismaError, match="zero_shot_head"):
        px.direct_logit_attribution(clip, images, 0)
    class_texts = text_tokens_for(clip.text.cfg, batch=4, seed=3)
    with torch.no_grad():
        clip.visual.set_unembed(clip.encode_text(class_texts, normalize=True), ["a", "b", "c", "d"])
        zero_shot = clip.visual(images)
    dla = px.direct_logit_attribution(clip, images, "c")
    torch.testing.assert_close(dla.values.sum(-1), zero_shot[:, 2], atol=ATOL, rtol=0)
    lens = px.logit_lens(clip, images)
    torch.testing.assert_close(lens.part("pooled").values[:, -1], zero_shot, atol=ATOL, rtol=0)
    # the image-text score still works with a zero-shot head installed
    dla = px.direct_logit_attribution(clip, images, px.ImageTextScore(tokens))
    torch.testing.assert_close(dla.values.sum(-1), expected, atol=ATOL, rtol=0)


def test_dla_refuses_what_is_not_linear_with_reasons(analysis_pair):
    p = analysis_pair("plain")
    with pytest.raises(PrismaError, match="attention head"):
        px.direct_logit_attribution(px.load(small_timm("siglip_map")), images_for(small_timm("siglip_map")), 0)
    with pytest.raises(InputError, match="linear readout"):
        px.direct_logit_attribution(p.tl, p.images, lambda out: out[:, 0])
    with pytest.raises(InputError, match="`by`"):
        px.direct_logit_attribution(p.tl, p.images, 0, by=("head", "neuron"))
    with pytest.raises(InputError, match="2 classes for 3 images"):
        px.direct_logit_attribution(p.tl, p.images, [0, 1])
    with pytest.raises(InputError, match=r"class indices must be in \[0, 7\)"):
        px.direct_logit_attribution(p.tl, p.images, torch.tensor([0, 9, 1]))
    with pytest.raises(PrismaError, match="out of range"):
        px.direct_logit_attribution(p.tl, p.images, 12)
    with pytest.raises(InputError, match="expected images"):
        px.direct_logit_attribution(p.tl, p.images[0], 0)
    with pytest.raises(InputError, match="classes: expected class indices or names"):
        px.logit_lens(p.tl, p.images, classes=object())
    with pytest.raises(InputError, match="expected a class index or name"):
        px.direct_logit_attribution(p.tl, p.images, [object()] * 3)
