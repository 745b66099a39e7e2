"""Tests that a plausible broken implementation fails, each against a computation of its own:
per-source DLA over a mirrored patch grid (sums unchanged), the deletion order reversed, and
attribution patching's gradients taken at the wrong run."""

from __future__ import annotations

import torch

import prisma_ext as px
from tests.support.models import images_for, small_timm


def test_per_source_dla_equals_zero_ablating_that_source_value():
    """Head h's share from source token k is what removing v[k, h] takes away from the head's
    write at the readout token, read through the readout with the final norm's scale frozen."""
    src = small_timm("plain", seed=7)
    model, images = px.load(src), images_for(src, batch=2, seed=3)
    classes = torch.tensor([1, 4])
    source = px.direct_logit_attribution(model, images, classes, by=("layer", "head", "source")).part("source")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
        final = cache[f"blocks.{n_layers - 1}.hook_resid_post"][:, 0]  # the CLS token the head reads
        scale = (final.var(-1, unbiased=False, keepdim=True) + model.cfg.eps_final).sqrt()
        unembed = model.head.weight[classes] * model.ln_final.w  # [batch, d]: logit per normalised unit

        def read(delta):  # what adding delta [batch, d] to the final CLS residual adds to the logit
            centred = delta - delta.mean(-1, keepdim=True)
            return (centred / scale * unembed).sum(-1)

        n_tokens = model.layout.n_tokens
        for layer in range(n_layers):
            out = cache[f"blocks.{layer}.hook_attn_out"][:, 0]
            for head in range(n_heads):
                for k in (0, 1, n_tokens // 2, n_tokens - 2):  # CLS, the first patch, a middle one, near the end

                    def ablate(v, hook, k=k, head=head):
                        v = v.clone()
                        v[:, k, head] = 0
                        return v

                    ablated_out = {}
                    keep = lambda x, hook, out=ablated_out: out.update(x=x[:, 0])  # noqa: E731
                    with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_v", ablate),
                                                (f"blocks.{layer}.hook_attn_out", keep)]):
                        model(images)
                    want = read(out - ablated_out["x"])
                    torch.testing.assert_close(source.values[:, layer, head, k], want, atol=1e-5, rtol=1e-4)


def test_the_deletion_curve_removes_the_top_ranked_patch_first():
    src = small_timm("plain", seed=8)
    model, images = px.load(src), images_for(src, batch=2, seed=4)
    layout = model.layout
    maps = torch.rand(2, layout.n_patches, generator=torch.Generator().manual_seed(5))
    result = px.faithfulness(model, images, 0, maps=maps, curves="deletion", n_steps=layout.n_patches)
    curve = result.part("curves").values[:, 0]  # [batch, step]
    rows, cols = layout.grid
    ph, pw = layout.patch_size
    with torch.no_grad():
        for b in range(2):
            removed = images[b].clone()
            first, second = maps[b].argsort(descending=True)[:2].tolist()
            r, c = divmod(first, cols)
            removed[:, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = 0  # the baseline: zeros
            want = model(removed[None]).softmax(-1)[0, 0]
            torch.testing.assert_close(curve[b, 1], want, atol=1e-5, rtol=0)
            r, c = divmod(second, cols)
            removed[:, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = 0
            torch.testing.assert_close(curve[b, 2], model(removed[None]).softmax(-1)[0, 0], atol=1e-5, rtol=0)


def test_attribution_patching_takes_its_gradients_at_the_base_run():
    """resid_pre at layer 1, each token: m(base) + (a_source - a_base) . dm/da, with dm/da taken by
    autograd at the base (corrupted) run here, by hand."""
    src = small_timm("dinov2_reg4", seed=9)
    model = px.load(src)
    clean, corrupted = images_for(src, batch=2, seed=5), images_for(src, batch=2, seed=6)
    a, b = torch.tensor([0, 2]), torch.tensor([3, 1])
    site = "blocks.1.hook_resid_pre"
    got = px.attribution_patching(model, clean, corrupted, px.LogitDiff(a, b), sites="resid_pre", layers=[1],
                                  progress=False)["resid_pre"].values[:, 0]  # [batch, token]
    held = {}

    def hold(x, hook):
        x = x.detach().requires_grad_(True)
        held["x"] = x
        return x

    with model.hooks(fwd_hooks=[(site, hold)]):
        out = model(corrupted)
    rows = torch.arange(2)
    metric = out[rows, a] - out[rows, b]
    grad, = torch.autograd.grad(metric.sum(), held["x"])
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=[site])
        delta = clean_cache[site] - held["x"]
        want = metric[:, None] + (delta * grad).sum(-1)  # [batch, token]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
