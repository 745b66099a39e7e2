"""Explaining a latent: its activations, top images, direct effect and ablation, each checked
against a direct measurement through plain hooks (TL) and across backends."""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from prisma_ext import zoo
from prisma_ext.errors import InputError
from prisma_ext.sae import SparseAutoencoder, splice
from prisma_ext.sae.concepts import auroc, concept_detectors
from prisma_ext.sae.explain import direct_effect, firing_summary, latent_ablation, latent_activations, top_images

SITE = "blocks.2.hook_resid_post"


def random_sae(d_in: int, d_sae: int = 96, k: int = 6, seed: int = 0) -> SparseAutoencoder:
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, "topk", k)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return sae


@pytest.fixture(scope="module")
def images():
    return zoo.normalize(zoo.heldout("shapes-vit", n=12, seed=3).images, "shapes-vit")


def test_latent_activations_are_the_sae_encoding_of_the_site_on_both_backends(model, images):
    sae = random_sae(model.cfg.d_model)
    acts = latent_activations(model, sae, SITE, images, latents=[5, 1, 40])
    _, cache = model.run_with_cache(images, names_filter=[SITE])
    expected = sae.encode(cache[SITE])[..., [5, 1, 40]]
    torch.testing.assert_close(acts.values, expected.detach(), atol=1e-6, rtol=0)
    assert acts.dims == ("batch", "token", "latent") and acts.coords["latent"] == [5, 1, 40]
    assert acts.grid().shape[-2:] == model.layout.grid  # the patch heatmaps
    traced = px.load("builtin:shapes-vit", backend="nnsight")
    torch.testing.assert_close(latent_activations(traced, sae, SITE, images, latents=[5, 1, 40]).values,
                               acts.values, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match=r"latents must be ints in \[0, d_sae=96\)"):
        latent_activations(model, sae, SITE, images, latents=[96])


def test_top_images_are_the_largest_peaks_in_order(model, images):
    sae = random_sae(model.cfg.d_model)
    acts = latent_activations(model, sae, SITE, images)
    latent = int(firing_summary(acts)["image_frequency"].argmax())
    order, peak = top_images(acts, latent, n=5)
    column = acts.values[..., latent].amax(1)
    torch.testing.assert_close(peak, column[order])
    assert torch.all(peak[:-1] >= peak[1:]) and float(peak[0]) == float(column.max())
    assert torch.all(peak > 0)


def test_direct_effect_is_the_logit_change_with_the_final_scale_frozen(model, images):
    """Adding a x W_dec[j] to the CLS token of the last residual stream, with ln_final's scale
    hooked to its clean value, changes the logits by a x direct_effect (within 1e-4)."""
    sae = random_sae(model.cfg.d_model)
    image = images[:1]
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    clean, cache = model.run_with_cache(image, names_filter=["ln_final.hook_scale"])
    a, latent = 2.5, 7

    def add(resid, hook):
        resid[:, 0] += a * sae.W_dec[latent].detach()
        return resid

    frozen = cache["ln_final.hook_scale"]
    edited = model.run_with_hooks(image, fwd_hooks=[(last, add), ("ln_final.hook_scale", lambda s, hook: frozen)])
    effect = direct_effect(model, sae, latent, image)
    torch.testing.assert_close((edited - clean)[0].detach(), a * effect.values, atol=1e-4, rtol=1e-4)
    assert effect.dims == ("class",) and effect.class_names == model.class_names
    unscaled = direct_effect(model, sae, latent)  # per unit of the normalised stream
    torch.testing.assert_close(unscaled.values / effect.meta["scale"], effect.values)


def test_latent_ablation_equals_the_spliced_edit_with_the_error_term(model, images):
    sae = random_sae(model.cfg.d_model)
    acts = latent_activations(model, sae, SITE, images)
    latent = int(acts.values.amax((0, 1)).argmax())  # the most active latent: ablating it changes something
    change = latent_ablation(model, sae, SITE, latent, images)
    clean = model(images)

    def ablate(z, hook):
        z[..., latent] = 0
        return z

    with torch.no_grad(), splice(model, sae, SITE, use_error_term=True):
        edited = model.run_with_hooks(images, fwd_hooks=[(f"{SITE}.hook_sae_acts_post", ablate)])
    torch.testing.assert_close(change.values, (edited - clean).detach(), atol=1e-5, rtol=0)
    assert change.values.abs().max() > 1e-3
    silent = int(acts.values.amax((0, 1)).argmin())
    if float(acts.values[..., silent].max()) == 0:  # a latent that never fires: nothing to remove
        assert latent_ablation(model, sae, SITE, silent, images).values.abs().max() < 1e-5
    traced = px.load("builtin:shapes-vit", backend="nnsight")
    torch.testing.assert_close(latent_ablation(traced, sae, SITE, latent, images).values, change.values, atol=1e-5,
                               rtol=0)


def test_auroc_counts_ties_as_half_and_matches_the_pairwise_definition():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 3), generator=gen).float()  # many ties
    labels = torch.rand(50, generator=gen) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean((0, 1))
    torch.testing.assert_close(auroc(scores, labels), pairwise)
    torch.testing.assert_close(auroc(-scores, labels), 1 - pairwise)
    with pytest.raises(InputError, match="positives and negatives"):
        auroc(scores, torch.zeros(50, dtype=torch.bool))


def test_concept_detectors_pick_on_one_set_and_score_on_the_other(model):
    """A planted detector: an SAE whose latent 3 reads the site's direction that separates two
    shapes; concept_detectors finds latent 3 and scores it on other images."""
    sel = zoo.heldout("shapes-vit", n=80, seed=11)
    held = zoo.heldout("shapes-vit", n=80, seed=12)
    x_sel, x_held = zoo.normalize(sel.images, "shapes-vit"), zoo.normalize(held.images, "shapes-vit")
    _, cache = model.run_with_cache(x_sel, names_filter=[SITE])
    cls = cache[SITE][:, 0]
    is_circle = sel.labels == 1
    direction = cls[is_circle].mean(0) - cls[~is_circle].mean(0)
    sae = SparseAutoencoder(model.cfg.d_model, 8, "standard")
    with torch.no_grad():
        sae.W_enc[:, 3] = direction / direction.norm()
        sae.b_enc[3] = -float((cls @ sae.W_enc[:, 3]).median())
    found = concept_detectors(model, sae, SITE, x_sel, {"circle": is_circle}, x_held, {"circle": held.labels == 1})
    assert found["circle"]["latent"] == 3
    assert found["circle"]["auroc"] > 0.9 and found["circle"]["auroc"] != found["circle"]["selection_auroc"]
