"""The patching methods take the targets the other methods take (a class, one per image, None,
LogitDiff, ImageTextScore on CLIP) and give exactly what the equivalent metric function gives."""

import pytest
import torch

import prisma_ext as px
from prisma_ext.analysis.patching import activation_patching, attribution_patching, image_text_patching
from prisma_ext.errors import InputError, PrismaError
from tests.support.clip_models import small_open_clip
from tests.support.models import images_for, small_timm

METHODS = {
    "activation": lambda *a, **k: activation_patching(*a, progress=False, **k),
    "attribution": attribution_patching,
}
NAMES = [f"c{i}" for i in range(7)]


def setup():
    src = small_timm("plain", seed=3)
    model = px.load(src)
    model.class_names = NAMES
    return model, images_for(src, batch=2, seed=1), images_for(src, batch=2, seed=2)


def logit_of(classes):
    """A hand-written per-image score: row r's logit of its image's class."""
    classes = torch.as_tensor(classes)
    return px.FunctionTarget(lambda out, examples: out[torch.arange(out.shape[0]), classes.expand(2)[examples]],
                             per_image=True)


def logit_diff(a, b):
    """A hand-written per-image logit difference (what px.LogitDiff must equal)."""
    a, b = torch.as_tensor(a).expand(2), torch.as_tensor(b).expand(2)
    return px.FunctionTarget(lambda out, examples: out[torch.arange(out.shape[0]), a[examples]]
                             - out[torch.arange(out.shape[0]), b[examples]], per_image=True)


def clip_score_diff(text_embeds, logit_scale):
    """A hand-written image-text score on the image embedding (what px.ImageTextScore must equal)."""
    texts = torch.nn.functional.normalize(text_embeds, dim=-1)
    return lambda out: logit_scale.exp() * (torch.nn.functional.normalize(out, dim=-1) @ texts.T)[:, 0]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for site in a:
        assert torch.equal(a[site].values, b[site].values), site
    assert torch.equal(a.meta["clean_metric"], b.meta["clean_metric"])
    assert torch.equal(a.meta["corrupted_metric"], b.meta["corrupted_metric"])


@pytest.mark.parametrize("method", METHODS)
def test_targets_equal_their_metric_functions(method):
    model, clean, corrupted = setup()
    run = METHODS[method]
    with torch.no_grad():
        predicted = model(clean).argmax(-1)
    pairs = [
        (px.LogitDiff(3, 5), logit_diff(3, 5)),
        (px.LogitDiff("c3", [5, 6]), logit_diff(3, [5, 6])),
        (4, logit_of(4)),
        ("c2", logit_of(2)),
        (["c1", "c6"], logit_of([1, 6])),
        (torch.tensor([0, 5]), logit_of([0, 5])),
        (None, logit_of(predicted)),  # each clean image's predicted class
    ]
    for target, fn in pairs:
        assert_same(run(model, clean, corrupted, target), run(model, clean, corrupted, fn))
    noising = dict(direction="noising", sites=("resid_pre", "z"), layers=1)
    assert_same(run(model, clean, corrupted, px.LogitDiff(3, 5), **noising),
                run(model, clean, corrupted, logit_diff(3, 5), **noising))


def test_targets_on_the_nnsight_backend():
    model, clean, corrupted = setup()
    traced = px.load(small_timm("plain", seed=3), backend="nnsight")
    for run in METHODS.values():
        want = run(model, clean, corrupted, px.LogitDiff(3, 5), sites=("resid_pre", "z"))
        got = run(traced, clean, corrupted, px.LogitDiff(3, 5), sites=("resid_pre", "z"))
        for site in want:
            torch.testing.assert_close(got[site].values, want[site].values, atol=1e-5, rtol=0)


def test_image_text_score_on_clip():
    clip = px.load(small_open_clip("ViT-B-16"))
    clean, corrupted = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    prompts = ["a photo of a cat", "a photo of a dog"]
    with torch.no_grad():
        texts = clip.encode_text(prompts)
    for run in METHODS.values():
        kw = dict(sites=("resid_pre", "mlp_out"))
        by_target = run(clip, clean, corrupted, px.ImageTextScore(prompts[:1]), **kw)
        by_fn = run(clip, clean, corrupted, clip_score_diff(texts[:1], clip.logit_scale), **kw)
        for site in by_fn:
            torch.testing.assert_close(by_target[site].values, by_fn[site].values, atol=1e-5, rtol=1e-6)
        # one prompt per image: image i is scored against prompts[i]
        per_image = run(clip, clean, corrupted, px.ImageTextScore(prompts), **kw)
        with torch.no_grad():
            want = clip.image_text_score(clean, prompts)
        torch.testing.assert_close(per_image.meta["clean_metric"], want, atol=1e-5, rtol=1e-6)

    with pytest.raises(InputError, match="activation_patching"):
        image_text_patching(clip, clean, corrupted, prompts, metric=px.ImageTextScore(prompts))

    with_head = px.load(small_open_clip("ViT-B-16"))
    with_head.use_zero_shot_head(["cat", "dog"], templates=["a photo of a {}."])
    with pytest.raises(PrismaError, match="image_text_patching"):
        activation_patching(with_head, clean, corrupted, px.ImageTextScore(prompts), progress=False)
    # the zero-shot head's classes work as targets
    by_name = activation_patching(with_head, clean, corrupted, px.LogitDiff("cat", "dog"), sites="resid_pre",
                                  progress=False)
    by_fn = activation_patching(with_head, clean, corrupted, logit_diff(0, 1), sites="resid_pre", progress=False)
    assert torch.equal(by_name["resid_pre"].values, by_fn["resid_pre"].values)


def test_bad_metrics():
    model, clean, corrupted = setup()
    for run in METHODS.values():
        for bad in (2.5, object(), {"a": 1}):
            with pytest.raises(InputError, match=r"metric: expected a function .*LogitDiff.*ImageTextScore"):
                run(model, clean, corrupted, bad)
        with pytest.raises(InputError, match="3 classes for 2 images"):
            run(model, clean, corrupted, [1, 2, 3])
        with pytest.raises(PrismaError, match="closest: c1"):
            run(model, clean, corrupted, "c11")
        with pytest.raises(PrismaError, match="needs a CLIP model"):
            run(model, clean, corrupted, px.ImageTextScore(["a cat"]))
        with pytest.raises(PrismaError, match="one number per example"):  # functions are still checked
            run(model, clean, corrupted, lambda out: out)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
