"""Analysis-layer findings of a new user's session, each reproduced: wrong or silent before, a
clear error or the right numbers now."""

from __future__ import annotations

import threading

import pytest
import torch

import prisma_ext as px
from prisma_ext.errors import InputError, PrismaError
from tests.support.clip_models import small_open_clip
from tests.support.models import images_for, small_timm
from tests.support.patcher import reference_patch


@pytest.fixture(scope="module")
def plain():
    src = small_timm("plain", seed=3)
    return src, px.load(src), images_for(src, batch=2, seed=1), images_for(src, batch=2, seed=2)


PATCHING = {"activation": lambda *a, **k: px.activation_patching(*a, progress=False, **k),
            "attribution": lambda *a, **k: px.attribution_patching(*a, progress=False, **k)}


@pytest.mark.parametrize("method", PATCHING)
def test_bad_batch_sizes_and_repeated_layers_or_heads_are_refused(plain, method):
    _, model, clean, corrupted = plain
    run = PATCHING[method]
    for bad in (-1, 0, 2.5, True):  # batch_size=-1 gave all zeros; 0 silently meant the default
        with pytest.raises(InputError, match="batch_size must be a positive int"):
            run(model, clean, corrupted, px.LogitDiff(0, 1), batch_size=bad)
    with pytest.raises(InputError, match=r"layers: \[1\] given more than once"):  # the copy stayed 0
        run(model, clean, corrupted, px.LogitDiff(0, 1), layers=[1, 1])
    with pytest.raises(InputError, match=r"heads: \[2\] given more than once"):
        run(model, clean, corrupted, px.LogitDiff(0, 1), sites="z", heads=[2, 2])
    for bad, message in ((dict(layers=[]), "empty list"), (dict(heads=[]), "empty list"),
                         (dict(layers="first"), "expected 'all'"), (dict(positions=1.5), "positions: expected")):
        with pytest.raises(PrismaError, match=message):
            run(model, clean, corrupted, px.LogitDiff(0, 1), sites="z", **bad)


def test_positions_and_readouts_follow_the_images_size():
    """dynamic_img_size at another size: positions='all' patched only the default token count,
    'rows' patched the wrong tokens, DLA failed on the size."""
    src = small_timm("plain", seed=5, dynamic_img_size=True)
    model = px.load(src)
    clean, corrupted = images_for(src, batch=1, seed=1, size=(40, 24)), images_for(src, batch=1, seed=2, size=(40, 24))
    n_tokens = 1 + 5 * 3
    every = px.activation_patching(model, clean, corrupted, px.LogitDiff(0, 1), sites="resid_pre", progress=False)
    assert every["resid_pre"].values.shape == (1, 2, n_tokens)
    rows = px.activation_patching(model, clean, corrupted, px.LogitDiff(0, 1), sites="resid_pre", positions="rows",
                                  layers=[1], progress=False)["resid_pre"]
    assert rows.labels("position") == [f"row {r}" for r in range(5)]
    for r in range(5):  # row r of a 5 x 3 grid: tokens 1 + 3r .. 3 + 3r
        _, out = reference_patch(model.mod_dict["blocks.1.hook_resid_pre"], lambda: model(clean),
                                 lambda: model(corrupted), [1 + 3 * r + c for c in range(3)])
        torch.testing.assert_close(rows.values[0, 0, r], out[0, 0] - out[0, 1], atol=1e-5, rtol=0)
    dla = px.direct_logit_attribution(model, clean, by=("layer", "head", "source"))
    torch.testing.assert_close(dla.values.sum(-1), dla.meta["score"], atol=1e-4, rtol=1e-4)
    assert dla.part("source").values.shape[-1] == n_tokens
    assert px.logit_lens(model, clean).values.shape[2] == n_tokens


def test_two_threads_on_one_model_get_their_own_answers(plain):
    """Hooks are the model's shared state: calls from two threads used to get each other's."""
    import sys

    _, model, clean, corrupted = plain
    targets = [px.LogitDiff(0, 1), px.LogitDiff(3, 4)]

    def call(i: int):
        return px.activation_patching(model, clean, corrupted, targets[i], sites=("resid_pre", "z"), batch_size=3,
                                      progress=False)

    alone = [call(0), call(1)]
    found: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                found[i].append(call(i))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so that runs interleave
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for i in (0, 1):
        for result in found[i]:
            for site in result:
                torch.testing.assert_close(result[site].values, alone[i][site].values, atol=1e-5, rtol=0)


def test_a_model_left_in_train_mode_is_run_in_eval_mode():
    """nnsight on a module left in .train(): dropout stayed on and repeated calls differed."""
    src = small_timm("plain", seed=3, drop_rate=0.5, attn_drop_rate=0.5, proj_drop_rate=0.5)
    traced = px.load(src, backend="nnsight")
    src.train()
    images = images_for(src, batch=2)
    first = px.direct_logit_attribution(traced, images, 0).values
    again = px.direct_logit_attribution(traced, images, 0).values
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert all(m.training for m in src.modules())  # the user's mode is back
    src.eval()
    torch.testing.assert_close(px.direct_logit_attribution(traced, images, 0).values, first, atol=0, rtol=0)


def test_the_nnsight_backend_builds_its_weights_once_and_leaves_the_rng_alone():
    src = small_timm("plain", seed=3)
    traced = px.load(src, backend="nnsight")
    images = images_for(src, batch=2)
    from prisma_ext.analysis.backend import Backend

    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    px.logit_lens(traced, images)
    assert torch.equal(torch.rand(2), expected)  # the global RNG was drawn from on every call
    first = Backend.of(traced).vit
    assert Backend.of(traced).vit is first  # one conversion per model (2.8 s a call on vit_small)
    with torch.no_grad():
        src.head.weight.mul_(2)  # the user changes a weight: the copy follows
    assert Backend.of(traced).vit is not first
    torch.testing.assert_close(px.logit_lens(traced, images).values, px.logit_lens(px.load(src), images).values,
                               atol=1e-5, rtol=0)


def test_targets_mean_what_they_say():
    clip = px.load(small_open_clip("ViT-B-16"))
    assert len(px.ImageTextScore("ab").texts) == 1  # a string is one prompt, not two characters
    _, model, clean, _ = plain_model()
    with pytest.raises(InputError, match="out of range"):  # wrapped to the last class before
        px.direct_logit_attribution(model, clean, px.LogitDiff(0, -1))
    with pytest.raises(InputError, match="out of range"):  # a raw IndexError before
        with pytest.warns(DeprecationWarning):
            target = px.metrics.logit_diff(0, 99)
        px.activation_patching(model, clean, clean, target, progress=False)
    with pytest.raises(InputError, match="a bool"):  # meant class 1 before
        px.direct_logit_attribution(model, clean, True)
    assert clip is not None


def plain_model():
    src = small_timm("plain", seed=3)
    return src, px.load(src), images_for(src, batch=2, seed=1), None


def test_obscure_errors_are_clear(plain):
    src, model, clean, corrupted = plain
    with pytest.warns(UserWarning, match="look like 0-255 pixel values"):
        model(clean.abs() * 100)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.raises(InputError, match=f"images are {dtype} and the model torch.float32"):
            px.logit_lens(model, clean.to(dtype))
    with pytest.raises(InputError, match="meta device"):
        model(torch.empty(2, 3, 32, 32, device="meta"))
    if not torch.cuda.is_available():
        with pytest.raises(PrismaError, match="no CUDA device"):
            px.load(src, device="cuda")
    with pytest.raises(PrismaError, match="meta"):
        px.load(src, device="meta")
    with pytest.raises(InputError, match="inference_mode"), torch.inference_mode():
        px.gradient_attention(model, clean)
    traced = px.load(src, backend="nnsight")
    with pytest.raises(InputError, match="empty batch"):
        traced.run_with_cache(clean[:0])
    with pytest.raises(InputError, match="expected images of 32x32"):  # not the maps' fault
        px.faithfulness(model, clean[..., :16, :16], maps=torch.rand(2, 16))
    with pytest.raises(InputError, match="n_steps must be a positive int"):
        px.captum_attribution(model, clean, method="integrated_gradients", n_steps=0)
    clip = px.load(small_open_clip("ViT-B-16"))
    with pytest.raises(InputError, match="add a batch axis"):
        px.image_text_patching(clip, torch.randn(3, 32, 32), torch.randn(3, 32, 32), ["a cat"], progress=False)


def test_gradient_methods_on_a_frozen_model(plain):
    """requires_grad_(False) on every parameter: the gradients at the sites are still there."""
    src, _, clean, corrupted = plain
    frozen = px.load(src)
    frozen.requires_grad_(False)
    want = px.gradient_attention(px.load(src), clean, 0).values
    torch.testing.assert_close(px.gradient_attention(frozen, clean, 0).values, want, atol=1e-6, rtol=0)
    a = px.attribution_patching(frozen, clean, corrupted, px.LogitDiff(0, 1), progress=False)
    b = px.attribution_patching(px.load(src), clean, corrupted, px.LogitDiff(0, 1), progress=False)
    for site in a:
        torch.testing.assert_close(a[site].values, b[site].values, atol=1e-6, rtol=0)
    traced = px.load(src, backend="nnsight")
    src.requires_grad_(False)
    try:
        torch.testing.assert_close(px.gradient_attention(traced, clean, 0).values, want, atol=1e-5, rtol=0)
    finally:
        src.requires_grad_(True)


def test_a_model_on_the_meta_device_or_another_device_is_named(plain):
    src, model, clean, _ = plain
    meta = px.load(src)
    meta.to("meta")
    with pytest.raises(InputError, match="weights are on the meta device"):
        px.logit_lens(meta, clean)
    with pytest.raises(InputError, match="images are on meta and the model on cpu"):
        px.direct_logit_attribution(model, clean.to("meta"))
