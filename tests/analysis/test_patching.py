"""Activation patching (batched, reusing the corrupted run) equals a naive loop of hooked forwards;
attribution patching and image-text patching on CLIP; bad input."""

import pytest
import torch

import prisma_ext as px
from prisma_ext.analysis.patching import activation_patching, attribution_patching, image_text_patching
from prisma_ext.errors import InputError, PrismaError
from tests.support.clip_models import small_open_clip
from tests.support.models import images_for, small_timm
from tests.support.patcher import reference_patch

SITE_NAMES = {"resid_pre": "blocks.{}.hook_resid_pre", "attn_out": "blocks.{}.hook_attn_out",
              "mlp_out": "blocks.{}.hook_mlp_out", "z": "blocks.{}.attn.hook_z"}


CORRECT, WRONG = torch.tensor([0, 1]), torch.tensor([2, 3])  # one pair of classes per image


def setup(variant, seed=0):
    src = small_timm(variant, seed=seed)
    clean, corrupted = images_for(src, batch=2, seed=1), images_for(src, batch=2, seed=2)
    return src, clean, corrupted, px.LogitDiff(CORRECT, WRONG)


def naive_value(model, clean, corrupted, metric, site, layer, positions, head=None, direction="denoising"):
    """One plain forward with a torch hook (the shared reference patcher): the clean value at
    (site, layer, positions[, head]) into the corrupted run, scored by hand."""
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    name = SITE_NAMES[site].format(layer)
    _, out = reference_patch(model.mod_dict[name], lambda: model(source), lambda: model(base), positions, head)
    rows = torch.arange(base.shape[0])
    return out[rows, CORRECT] - out[rows, WRONG]


@pytest.mark.parametrize(("variant", "direction"), [("plain", "denoising"), ("plain", "noising"),
                                                     ("dinov2_reg4", "denoising"), ("dinov2_reg4", "noising"),
                                                     ("deit_distilled", "denoising")])
def test_batched_sweep_equals_naive_loop(variant, direction):
    src, clean, corrupted, metric = setup(variant)
    model = px.load(src)
    result = activation_patching(model, clean, corrupted, metric, batch_size=7, direction=direction,
                                 progress=False)
    n_tokens, n_heads = model.layout.n_tokens, model.cfg.n_heads
    with torch.no_grad():
        for site in SITE_NAMES:
            values = result[site].values
            for layer in range(model.cfg.n_layers):
                for pos in range(n_tokens):
                    if site == "z":
                        for head in range(n_heads):
                            want = naive_value(model, clean, corrupted, metric, site, layer, [pos], head, direction)
                            torch.testing.assert_close(values[:, layer, head, pos], want, atol=1e-5, rtol=0)
                    else:
                        want = naive_value(model, clean, corrupted, metric, site, layer, [pos], None, direction)
                        torch.testing.assert_close(values[:, layer, pos], want, atol=1e-5, rtol=0)
    assert result["z"].dims == ("batch", "layer", "head", "token")
    assert result["resid_pre"].values.shape == (2, model.cfg.n_layers, n_tokens)


@pytest.mark.parametrize("variant", ["plain", "deit_distilled", "dinov2_reg4", "gap_no_cls", "siglip_map"])
def test_run_from_readout_only_keeps_the_output(variant):
    """The sweep's restart carries only the readout's tokens through the last block: same output."""
    src = small_timm(variant)
    model, images = px.load(src), images_for(src, batch=3)
    n_layers, last = model.cfg.n_layers, model.cfg.n_layers - 1
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=lambda n: n.endswith("hook_resid_pre"))
        for layer in range(n_layers):
            resid = cache[f"blocks.{layer}.hook_resid_pre"]
            full = model.run_from(resid, layer)
            torch.testing.assert_close(model.run_from(resid, layer, readout_only=True), full, atol=1e-5, rtol=0)
        # the explicit-softmax path (a pattern hook in the last block) as well
        with model.hooks(fwd_hooks=[(f"blocks.{last}.attn.hook_pattern", lambda value, hook: value)]):
            fast = model.run_from(resid, last, readout_only=True)
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)
        kept = model.run_from(resid, last, return_type="resid", readout_only=True).shape[1]
    assert kept == (1 + model.cfg.n_dist if model.cfg.global_pool == "token" else model.layout.n_tokens)


def test_a_users_hook_on_the_last_block_sees_every_token():
    src, clean, corrupted, metric = setup("plain")
    model = px.load(src)
    last = model.cfg.n_layers - 1
    seen = []
    model.add_hook(f"blocks.{last}.attn.hook_pattern", lambda value, hook: seen.append(value.shape[2]))
    try:
        with_hook = activation_patching(model, clean, corrupted, metric, sites="resid_pre", progress=False)
    finally:
        model.reset_hooks()
    assert set(seen) == {model.layout.n_tokens}
    plain = activation_patching(model, clean, corrupted, metric, sites="resid_pre", progress=False)
    torch.testing.assert_close(with_hook["resid_pre"].values, plain["resid_pre"].values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["plain", "dinov2_reg4", "gap_no_cls"])
def test_both_backends_give_the_same_sweep(variant):
    src, clean, corrupted, metric = setup(variant, seed=4)
    tl = activation_patching(px.load(src), clean, corrupted, metric, positions="rows", progress=False)
    traced = px.load(src, backend="nnsight")
    nn = activation_patching(traced, clean, corrupted, metric, positions="rows", progress=False)
    assert nn.meta["backend"] == "nnsight" and nn.meta["reuse"]  # the blocks before each patch are skipped
    full = activation_patching(traced, clean, corrupted, metric, positions="rows", progress=False, reuse=False)
    for site in tl:
        torch.testing.assert_close(nn[site].values, tl[site].values, atol=1e-5, rtol=0)
        torch.testing.assert_close(full[site].values, tl[site].values, atol=1e-5, rtol=0)


def test_a_traced_restart_skips_the_earlier_blocks():
    """The nnsight backend's restart from layer 1 runs no earlier block (their attention is never
    called) and gives the TL backend's restart output."""
    from prisma_ext.analysis.backend import Backend

    src = small_timm("dinov2_reg4", seed=4)
    images = images_for(src, batch=2, seed=1)
    tl, traced = Backend.of(px.load(src)), Backend.of(px.load(src, backend="nnsight"))
    assert traced.can_restart
    with torch.no_grad():
        resid = tl.run(images, read=["blocks.1.hook_resid_pre"]).acts["blocks.1.hook_resid_pre"] * 1.5
        calls = [0] * len(src.blocks)
        handles = [b.attn.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
                   for i, b in enumerate(src.blocks)]
        try:
            got = traced.restart(resid, 1, {}, torch.arange(2), images)
        finally:
            for h in handles:
                h.remove()
        want = tl.restart(resid, 1, {}, torch.arange(2))
    assert calls == [0] + [1] * (len(src.blocks) - 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_patching_everything_or_nothing():
    src, clean, corrupted, metric = setup("dinov2_reg4")
    model = px.load(src)
    every = list(range(model.layout.n_tokens))
    result = activation_patching(model, clean, corrupted, metric, sites="resid_pre", layers=0,
                                 positions={"every token": every, "no token": []}, progress=False)
    values = result["resid_pre"].values  # [batch, 1, 2]
    torch.testing.assert_close(values[:, 0, 0], result.meta["clean_metric"], atol=1e-5, rtol=0)
    torch.testing.assert_close(values[:, 0, 1], result.meta["corrupted_metric"], atol=1e-5, rtol=0)
    assert (result.meta["clean_metric"] - result.meta["corrupted_metric"]).abs().min() > 1e-3
    norm = activation_patching(model, clean, corrupted, metric, sites="resid_pre", layers=0,
                               positions={"every token": every, "no token": []}, normalize=True, progress=False)
    torch.testing.assert_close(norm["resid_pre"].values[:, 0], torch.tensor([[1.0, 0.0]] * 2), atol=1e-4, rtol=0)


def test_position_specs_and_tables():
    src, clean, corrupted, metric = setup("dinov2_reg4")
    model = px.load(src)
    grid = model.layout.grid
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[0, :] = True
    by_mask = activation_patching(model, clean, corrupted, metric, sites="resid_pre", positions=mask, progress=False)
    by_rows = activation_patching(model, clean, corrupted, metric, sites="resid_pre", positions="rows",
                                  progress=False)
    torch.testing.assert_close(by_mask["resid_pre"].values[..., 0], by_rows["resid_pre"].values[..., 0])
    prefix = activation_patching(model, clean, corrupted, metric, sites="mlp_out", positions="prefix",
                                 progress=False)
    assert prefix["mlp_out"].labels("position") == ["cls", "reg0", "reg1", "reg2", "reg3"]
    patches = activation_patching(model, clean, corrupted, px.ClassProb(1), sites="attn_out", positions="patches",
                                  progress=False)
    assert patches["attn_out"].grid().shape == (2, model.cfg.n_layers, *grid)
    table = patches.to_dataframe()
    assert set(table.columns) >= {"batch", "layer", "patch", "value", "site"} and len(table) == 2 * 2 * 9
    assert patches.plot(batch=1).data
    heads = activation_patching(model, clean, corrupted, metric, sites="z", layers=[0], progress=False)
    assert heads.plot(site="z").layout.title.text.endswith("(head 0; pick with head=...)")  # says what it fixed
    assert "head" not in heads.plot(site="z", head=1).layout.title.text


def test_attribution_patching_matches_on_both_backends_and_is_exact_where_linear():
    src, clean, corrupted, metric = setup("plain", seed=6)
    tl = attribution_patching(px.load(src), clean, corrupted, metric)
    nn = attribution_patching(px.load(src, backend="nnsight"), clean, corrupted, metric)
    for site in tl:
        torch.testing.assert_close(nn[site].values, tl[site].values, atol=1e-5, rtol=0)
    # patching nothing: the estimate is the corrupted metric itself
    empty = attribution_patching(px.load(src), clean, corrupted, metric, sites="resid_pre", positions=[[]])
    torch.testing.assert_close(empty["resid_pre"].values[:, :, 0],
                               empty.meta["corrupted_metric"][:, None].expand(2, 2), atol=1e-6, rtol=0)


def test_image_text_patching_on_clip():
    clip = px.load(small_open_clip("ViT-B-16"))
    clean, corrupted = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    every = {"all": list(range(clip.visual.layout.n_tokens))}
    for layer in range(clip.visual.cfg.n_layers):
        result = image_text_patching(clip, clean, corrupted, ["a photo of a cat", "a photo of a dog"],
                                     sites=("resid_pre",), layers=layer, positions=every, progress=False)
        torch.testing.assert_close(result["resid_pre"].values[:, 0, 0], result.meta["clean_metric"],
                                   atol=1e-5, rtol=0)
    with torch.no_grad():
        texts = clip.encode_text(["a photo of a cat", "a photo of a dog"], normalize=True)
        sims = clip.logit_scale.exp() * clip.encode_image(clean, normalize=True) @ texts.T
    torch.testing.assert_close(result.meta["clean_metric"], sims[:, 0] - sims[:, 1], atol=1e-5, rtol=0)

    text = image_text_patching(clip, ["a photo of a cat", "a red car"], ["a photo of a dog", "a blue car"],
                               images=torch.randn(1, 3, 32, 32), tower="text", sites=("resid_pre", "z"),
                               progress=False)
    values = text["resid_pre"].values  # [prompt, layer, position]
    torch.testing.assert_close(values[0, 0, 5], text.meta["clean_metric"][0], atol=1e-5, rtol=0)  # "cat"
    torch.testing.assert_close(values[1, 0, 2], text.meta["clean_metric"][1], atol=1e-5, rtol=0)  # "red"
    torch.testing.assert_close(values[0, 0, 2], text.meta["corrupted_metric"][0], atol=1e-5, rtol=0)
    assert text["resid_pre"].labels("position")[:3] == ["t0", "t1", "t2"]  # text tokens, not patches
    with pytest.raises(InputError, match=r"prompts of \[4\] tokens and corrupted prompts of \[5\]"):
        image_text_patching(clip, ["a cat"], ["a big dog"], images=torch.randn(1, 3, 32, 32), tower="text")
    for grid_only in ("rows", "patches", torch.ones(1, 4, dtype=torch.bool)):
        with pytest.raises(PrismaError, match="text has no patch grid"):
            image_text_patching(clip, ["a cat"], ["a dog"], images=torch.randn(1, 3, 32, 32), tower="text",
                                positions=grid_only)


def test_bad_input():
    src, clean, corrupted, metric = setup("plain")
    model = px.load(src)
    with pytest.raises(InputError, match="same shape"):
        activation_patching(model, clean, corrupted[:1], metric, progress=False)
    with pytest.raises(InputError, match="same shape"):
        attribution_patching(model, clean, corrupted[..., :16], metric)
    with pytest.raises(PrismaError, match="one number per example"):
        activation_patching(model, clean, corrupted, lambda out: out, progress=False)
    with pytest.raises(PrismaError, match="one number per example"):
        attribution_patching(model, clean, corrupted, lambda out: out.sum())
    with pytest.raises(PrismaError, match="closest: resid_pre"):
        activation_patching(model, clean, corrupted, metric, sites=["resid_pr"], progress=False)
    with pytest.raises(PrismaError, match="direction"):
        activation_patching(model, clean, corrupted, metric, direction="sideways", progress=False)
    with pytest.raises(PrismaError, match="layers must lie"):
        activation_patching(model, clean, corrupted, metric, layers=[5], progress=False)
    with pytest.raises(PrismaError, match="patch grid's shape"):
        activation_patching(model, clean, corrupted, metric, positions=torch.ones(3, 3, dtype=torch.bool),
                            progress=False)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
