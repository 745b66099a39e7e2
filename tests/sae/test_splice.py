"""Splicing an SAE into a hooked model: with the error term the model is unchanged, without it the
site is the reconstruction (checked against a plain hook doing the same), latents are sites by
SAELens's names, and leaving (even on an error) restores everything."""

from __future__ import annotations

import pytest
import torch

from prisma_ext.errors import InputError, UnknownNameError
from prisma_ext.sae import SparseAutoencoder, splice
from tests.sae.test_formats import random_sae

SITE = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def images(model):
    return torch.randn(2, 3, *model.cfg.img_size, generator=torch.Generator().manual_seed(0))


def sae_for(model, architecture="topk") -> SparseAutoencoder:
    return random_sae(architecture, d_in=model.cfg.d_model, d_sae=4 * model.cfg.d_model)


def test_with_the_error_term_the_model_is_unchanged(model, images):
    sae = sae_for(model)
    with torch.no_grad():
        want = model(images)
        with splice(model, sae, SITE, use_error_term=True):
            got = model(images)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_without_it_the_site_is_the_reconstruction(model, images):
    sae = sae_for(model)
    with torch.no_grad():
        want = model.run_with_hooks(images, fwd_hooks=[(SITE, lambda x, hook: sae.decode(sae.encode(x)))])
        with splice(model, sae, SITE):
            got = model(images)
        plain = model(images)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-3  # the reconstruction is not the activation: the splice did something


def test_latents_are_sites_by_saelens_names_and_edits_reach_the_output(model, images):
    sae = sae_for(model)
    name = f"{SITE}.hook_sae_acts_post"
    with torch.no_grad(), splice(model, sae, SITE, use_error_term=True):
        _, cache = model.run_with_cache(images)
        assert cache[name].shape == (2, model.cfg.layout.n_tokens, sae.d_sae)
        assert {f"{SITE}.{h}" for h in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_recons", "hook_sae_error",
                                        "hook_sae_output")} <= set(model.hook_dict)
        torch.testing.assert_close(cache[f"{SITE}.hook_sae_input"], cache[SITE], atol=1e-5, rtol=0)

        def ablate(acts, hook):
            acts[..., 7] = 0
            return acts

        edited = model.run_with_hooks(images, fwd_hooks=[(name, ablate)])
    # the reference: the same ablation as a plain hook on the site
    def by_hand(x, hook):
        acts = sae.encode(x)
        clean = sae.decode(acts)
        acts[..., 7] = 0
        return sae.decode(acts) + (x - clean)

    with torch.no_grad():
        want = model.run_with_hooks(images, fwd_hooks=[(SITE, by_hand)])
    torch.testing.assert_close(edited, want, atol=1e-5, rtol=0)


def test_leaving_restores_the_model_even_after_an_error(model, images):
    sae = sae_for(model)
    before = dict(model.hook_dict)
    with torch.no_grad():
        want = model(images)
    with pytest.raises(RuntimeError, match="inside"):
        with splice(model, sae, SITE):
            model.hook_dict[f"{SITE}.hook_sae_acts_post"].add_hook(lambda acts, hook: acts)
            raise RuntimeError("inside")
    assert dict(model.hook_dict) == before and all(not h._forward_hooks for h in model.hook_dict.values())
    assert not any(getattr(sae, h)._forward_hooks for h in ("hook_sae_acts_post", "hook_sae_input"))
    assert sae.use_error_term is False and sae.hook_sae_acts_post.name == "hook_sae_acts_post"
    assert not any(n.startswith("sae") for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(images), want, atol=0, rtol=0)


def test_bad_splices_are_refused_by_name(model):
    with pytest.raises(UnknownNameError, match="closest"):
        with splice(model, sae_for(model), "blocks.2.hook_resid_postt"):
            pass
    with pytest.raises(InputError, match=f"d_in=12 but {SITE} is {model.cfg.d_model} wide"):
        with splice(model, random_sae(), SITE):
            pass
    model.hook_dict[SITE].add_hook(lambda x, hook: x)
    try:
        with pytest.raises(InputError, match="has hooks attached"):
            with splice(model, sae_for(model), SITE):
                pass
    finally:
        model.reset_hooks()
    with pytest.raises(InputError, match="not a hooked model"):
        with splice(torch.nn.Linear(2, 2), sae_for(model), SITE):
            pass
