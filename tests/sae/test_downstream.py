"""Downstream scores of a spliced SAE: an exact SAE recovers everything, and for any SAE the
scores equal a direct measurement through plain hooks."""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from prisma_ext import zoo
from prisma_ext.errors import InputError, UnknownNameError
from prisma_ext.sae import SparseAutoencoder
from prisma_ext.sae.downstream import downstream
from tests.sae.test_formats import random_sae

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup():
    model = px.load("builtin:shapes-vit")
    scenes = zoo.heldout("shapes-vit", n=12)
    return model, zoo.normalize(scenes.images, "shapes-vit"), scenes.labels


def exact_sae(d: int) -> SparseAutoencoder:
    """ReLU(x) - ReLU(-x) = x: latents [x+, x-] decode back to x exactly."""
    sae = SparseAutoencoder(d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def test_an_exact_sae_recovers_everything(setup):
    model, images, labels = setup
    scores = downstream(model, exact_sae(model.cfg.d_model), SITE, images, labels=labels, batch_size=5)
    assert scores["kl_spliced"] < 1e-8 and scores["kl_ablated"] > 0.1
    assert abs(scores["kl_recovered"] - 1) < 1e-6 and scores["agreement"] == 1.0
    assert scores["accuracy_spliced"] == scores["accuracy_clean"] > 0.9 and scores["accuracy_recovered"] == 1.0


def test_the_scores_equal_a_direct_measurement(setup):
    model, images, labels = setup
    sae = random_sae("topk", d_in=model.cfg.d_model, d_sae=256)
    scores = downstream(model, sae, SITE, images, labels=labels, batch_size=5)
    with torch.no_grad():
        clean = model(images)
        spliced = model.run_with_hooks(images, fwd_hooks=[(SITE, lambda x, hook: sae.decode(sae.encode(x)))])
        _, cache = model.run_with_cache(images)
        mean = cache[SITE].mean((0, 1))
        ablated = model.run_with_hooks(images, fwd_hooks=[(SITE, lambda x, hook: mean.expand_as(x))])
    kl = torch.nn.functional.kl_div(spliced.log_softmax(-1), clean.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    kl_abl = torch.nn.functional.kl_div(ablated.log_softmax(-1), clean.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean()
    assert scores["kl_spliced"] == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    assert scores["kl_recovered"] == pytest.approx(1 - float(kl / kl_abl), rel=1e-4, abs=1e-6)
    assert scores["agreement"] == pytest.approx(float((spliced.argmax(-1) == clean.argmax(-1)).float().mean()))
    assert scores["accuracy_spliced"] == pytest.approx(float((spliced.argmax(-1) == labels).float().mean()))


def test_bad_input_is_refused(setup):
    model, images, labels = setup
    with pytest.raises(InputError, match="images must be a batch"):
        downstream(model, exact_sae(model.cfg.d_model), SITE, images[0])
    with pytest.raises(InputError, match="labels must be a tensor"):
        downstream(model, exact_sae(model.cfg.d_model), SITE, images, labels=labels[:3])
    with pytest.raises(UnknownNameError, match=f"closest: {SITE}"):
        downstream(model, exact_sae(model.cfg.d_model), SITE + "x", images)
    with pytest.raises(InputError, match="batch_size must be a positive int"):
        downstream(model, exact_sae(model.cfg.d_model), SITE, images, batch_size=0)
