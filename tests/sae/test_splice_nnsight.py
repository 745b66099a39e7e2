"""Splicing an SAE into a traced model (the nnsight backend): the same numbers as the TL splice
(outputs, latents, ablations, gradients, downstream scores), latents are sites by SAELens's names
in every way a traced model is read (trace, run_with_cache, Backend.run, several invokes), and
leaving (even on an error) leaves nothing behind."""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from prisma_ext import zoo
from prisma_ext.analysis.backend import Backend
from prisma_ext.errors import InputError, UnknownNameError
from prisma_ext.sae import splice
from prisma_ext.sae.dictionary import SAE_HOOKS
from prisma_ext.sae.downstream import downstream
from tests.sae.test_formats import random_sae

SITE = "blocks.2.hook_resid_post"
ACTS = f"{SITE}.hook_sae_acts_post"


@pytest.fixture(scope="module")
def traced():
    return px.load("builtin:shapes-vit", backend="nnsight")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sae(model):
    return random_sae("topk", d_in=model.cfg.d_model, d_sae=4 * model.cfg.d_model)


def traced_output(traced, images):
    with torch.no_grad(), traced.trace(images):
        out = traced.output.save()
    return out


def strongest_latent(sae, value: torch.Tensor) -> int:
    """The latent most active on the CLS tokens (ablating it surely moves the logits)."""
    return int(sae.encode(value[:, 0]).sum(0).argmax())


def ablate(latent: int):
    def edit(acts: torch.Tensor) -> torch.Tensor:
        acts = acts.clone()
        acts[..., latent] = 0
        return acts
    return edit


def test_with_the_error_term_the_traced_model_is_unchanged(traced, sae, images):
    want = traced_output(traced, images)
    with torch.no_grad(), splice(traced, sae, SITE, use_error_term=True):
        with traced.trace(images):
            error = traced.site(f"{SITE}.hook_sae_error").save()
            got = traced.output.save()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert error.abs().max() > 1e-2  # the SAE ran: its reconstruction is not exact


def test_without_it_the_traced_output_and_latents_are_the_tl_ones(model, traced, sae, images):
    with torch.no_grad():
        _, clean = traced.run_with_cache(images, names_filter=[SITE])
        unspliced = traced_output(traced, images)
        with splice(model, sae, SITE):
            want, tl_cache = model.run_with_cache(images)
        with splice(traced, sae, SITE):
            with traced.trace(images):
                acts = traced.site(ACTS).save()
                site = traced.site(SITE).save()
                got = traced.output.save()
            cached_out, cache = traced.run_with_cache(images, names_filter=[ACTS, f"{SITE}.hook_sae_input"])
            run = Backend.of(traced).run(images, read=[ACTS])
            plain = traced(images)  # a forward outside any trace goes through the SAE too
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - unspliced).abs().max() > 1e-3
    for other in (cached_out, run.output, plain):
        torch.testing.assert_close(other, got, atol=1e-6, rtol=0)
    torch.testing.assert_close(acts, tl_cache[ACTS], atol=1e-5, rtol=0)
    torch.testing.assert_close(acts, sae.encode(clean[SITE]), atol=1e-5, rtol=0)
    torch.testing.assert_close(cache[ACTS], acts, atol=0, rtol=0)
    torch.testing.assert_close(run.acts[ACTS], acts, atol=0, rtol=0)
    torch.testing.assert_close(cache[f"{SITE}.hook_sae_input"], clean[SITE], atol=0, rtol=0)
    # the site itself reads the spliced value (as on the TL backend): the reconstruction
    torch.testing.assert_close(site, tl_cache[SITE], atol=1e-5, rtol=0)
    torch.testing.assert_close(site, sae.decode(sae.encode(clean[SITE])), atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_error_term", [True, False])
def test_ablating_a_latent_gives_the_same_output_on_both_backends(model, traced, sae, images, use_error_term):
    _, clean = traced.run_with_cache(images, names_filter=[SITE])
    edit = {ACTS: ablate(strongest_latent(sae, clean[SITE]))}
    with torch.no_grad():
        outputs = {}
        for m in (model, traced):
            with splice(m, sae, SITE, use_error_term=use_error_term):
                backend = Backend.of(m)
                outputs[backend.kind] = backend.run(images).output, backend.run(images, edit=edit).output
        with splice(traced, sae, SITE, use_error_term=use_error_term):  # an in-place edit in a trace body
            with traced.trace(images):
                traced.site(ACTS)[..., strongest_latent(sae, clean[SITE])] = 0
                in_trace = traced.output.save()

        def by_hand(x, hook):  # the error term is the clean reconstruction's, as dictionary.py has it
            out = sae.decode(edit[ACTS](sae.encode(x)))
            return out + (x - sae.decode(sae.encode(x))) if use_error_term else out

        want = model.run_with_hooks(images, fwd_hooks=[(SITE, by_hand)])
    (tl_plain, tl_edited), (nn_plain, nn_edited) = outputs["tl"], outputs["nnsight"]
    torch.testing.assert_close(nn_plain, tl_plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(nn_edited, tl_edited, atol=1e-5, rtol=0)
    torch.testing.assert_close(nn_edited, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_trace, nn_edited, atol=1e-6, rtol=0)
    assert (nn_edited - nn_plain).abs().max() > 1e-3  # the edit reached the output


@pytest.mark.parametrize("site", ["blocks.1.hook_resid_mid", "blocks.2.hook_resid_pre", "blocks.0.attn.hook_q",
                                  "ln_final.hook_normalized"])
def test_inputs_in_place_sites_views_and_norms_splice_as_on_tl(model, traced, images, site):
    """A module's input (a pre-hook), an in-place residual (the skip connection sees the SAE too),
    a view of a fused qkv output and a norm's output all give the TL splice's numbers."""
    d = model.cfg.d_head if "hook_q" in site else model.cfg.d_model
    sae = random_sae("topk", d_in=d, d_sae=4 * d)
    acts = f"{site}.hook_sae_acts_post"
    with torch.no_grad():
        unspliced = traced_output(traced, images)
        got = {}
        for m in (model, traced):
            with splice(m, sae, site):
                backend = Backend.of(m)
                run = backend.run(images, read=[acts])
                latent = int(run.acts[acts][:, 0].flatten(0, -2).sum(0).argmax())
                got[backend.kind] = run, backend.run(images, edit={acts: ablate(latent)}).output
    (tl_run, tl_edited), (nn_run, nn_edited) = got["tl"], got["nnsight"]
    torch.testing.assert_close(nn_run.output, tl_run.output, atol=1e-5, rtol=0)
    torch.testing.assert_close(nn_run.acts[acts], tl_run.acts[acts], atol=1e-5, rtol=0)
    torch.testing.assert_close(nn_edited, tl_edited, atol=1e-5, rtol=0)
    assert (nn_run.output - unspliced).abs().max() > 1e-4 and (nn_edited - nn_run.output).abs().max() > 1e-5


def test_gradients_and_several_invokes_go_through_the_sae(model, traced, sae, images):
    grads = {}
    for m in (model, traced):
        with splice(m, sae, SITE, use_error_term=True):
            run = Backend.of(m).run(images, read=[ACTS], grad_of=lambda out: out[:, 0].sum())
            grads[Backend.of(m).kind] = run.grads[ACTS]
    assert grads["nnsight"].abs().max() > 0
    torch.testing.assert_close(grads["nnsight"], grads["tl"], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), splice(traced, sae, SITE):
        _, cache = traced.run_with_cache(images, names_filter=[ACTS])
        with traced.trace() as tracer:
            with tracer.invoke(images[:1]):
                first = traced.site(ACTS).save()
            with tracer.invoke(images[1:]):
                second = traced.site(ACTS).save()
    torch.testing.assert_close(torch.cat([first, second]), cache[ACTS], atol=1e-6, rtol=0)


def snapshot(traced, sae) -> dict:
    """Everything a splice could leave behind on the model or the SAE."""
    from nnsight.intervention.source import STATE

    modules = traced._module.named_modules()
    return {"hooks": {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in modules},
            "bodies": {n: m.__dict__[STATE].body for n, m in traced._module.named_modules() if STATE in m.__dict__},
            "sites": traced.sites, "names": traced.site_names, "order": dict(traced._px_order),
            "props": set(traced._px_props), "attrs": set(traced.__dict__),
            "sae_hooks": {h: dict(getattr(sae, h)._forward_hooks) for h in SAE_HOOKS},
            "flags": {n: m.fused_attn for n, m in traced._module.named_modules() if hasattr(m, "fused_attn")},
            "error_term": sae.use_error_term, "params": [n for n, _ in traced._module.named_parameters()]}


@pytest.mark.parametrize("site", [SITE, "blocks.1.hook_resid_mid", "blocks.0.attn.hook_pattern"])
def test_leaving_restores_everything_even_after_an_error(traced, images, site):
    d = traced.site_shapes()[site][-1]
    sae = random_sae("topk", d_in=d, d_sae=4 * d)
    traced.run_with_cache(images, names_filter=[site])  # props of the plain sites are cached before
    before, want = snapshot(traced, sae), traced_output(traced, images)
    with pytest.raises(RuntimeError, match="inside"):
        with splice(traced, sae, site, use_error_term=True):
            assert snapshot(traced, sae) != before  # inside, the splice is there
            with torch.no_grad(), traced.trace(images):
                traced.site(f"{site}.hook_sae_acts_post").save()
                raise RuntimeError("inside the trace")
    with pytest.raises(RuntimeError, match="inside"):
        with splice(traced, sae, site):
            traced.run_with_cache(images, names_filter=[f"{site}.hook_sae_recons"])
            raise RuntimeError("inside the with")
    assert snapshot(traced, sae) == before
    torch.testing.assert_close(traced_output(traced, images), want, atol=0, rtol=0)


def test_bad_splices_are_refused_by_name(traced, sae, images):
    before = snapshot(traced, sae)
    with pytest.raises(UnknownNameError, match="closest: blocks.2.hook_resid_post"):
        with splice(traced, sae, "blocks.2.hook_resid_postt"):
            pass
    with pytest.raises(InputError, match=f"d_in=12 but {SITE} is 64 wide"):
        with splice(traced, random_sae(), SITE):
            pass
    with splice(traced, sae, SITE):
        with pytest.raises(InputError, match="already has an SAE spliced in"):
            with splice(traced, sae, SITE):
                pass
        with pytest.raises(InputError, match="an SAE's own site"):
            with splice(traced, random_sae("topk", d_in=sae.d_sae, d_sae=8), ACTS):
                pass
        with pytest.raises(InputError, match="cannot trace remotely"):
            with traced.trace(images, remote="local"):
                traced.output.save()
        assert ACTS in traced.site_names  # the outer splice is still there
    object.__setattr__(traced, "default_remote", True)  # what a RemoteTracedViT built with remote=True has
    try:
        with pytest.raises(InputError, match="traces remotely by default"):
            with splice(traced, sae, SITE):
                pass
    finally:
        del traced.__dict__["default_remote"]
    with pytest.raises(InputError, match="expected a SparseAutoencoder"):
        with splice(traced, torch.nn.Linear(64, 64), SITE):
            pass
    assert snapshot(traced, sae) == before


def test_downstream_gives_the_same_scores_on_both_backends(model, traced):
    site = "blocks.1.hook_resid_post"
    scenes = zoo.heldout("shapes-vit", n=8)
    images, labels = zoo.normalize(scenes.images, "shapes-vit"), scenes.labels
    sae = random_sae("topk", d_in=model.cfg.d_model, d_sae=256)
    tl = downstream(model, sae, site, images, labels=labels, batch_size=3)
    nn = downstream(traced, sae, site, images, labels=labels, batch_size=3)
    assert tl.keys() == nn.keys()
    for key in tl:
        assert nn[key] == pytest.approx(tl[key], abs=1e-5), key
    with torch.no_grad():  # by hand, on the traced model
        clean, cache = traced.run_with_cache(images, names_filter=[site])
        mean = cache[site].mean((0, 1))
        outs = {}
        for name, fn in (("spliced", lambda x: sae.decode(sae.encode(x))), ("ablated", lambda x: mean.expand_as(x))):
            with traced.trace(images):
                traced.set_site(site, fn(traced.site(site)))
                outs[name] = traced.output.save()
    log_p = clean.log_softmax(-1)
    kl = {n: float((log_p.exp() * (log_p - o.log_softmax(-1))).sum(-1).mean()) for n, o in outs.items()}
    assert kl["ablated"] > 0.05
    assert nn["kl_spliced"] == pytest.approx(kl["spliced"], rel=1e-4, abs=1e-6)
    assert nn["kl_recovered"] == pytest.approx(1 - kl["spliced"] / kl["ablated"], rel=1e-4, abs=1e-6)
    assert nn["agreement"] == pytest.approx(float((outs["spliced"].argmax(-1) == clean.argmax(-1)).float().mean()))
    assert nn["accuracy_spliced"] == pytest.approx(float((outs["spliced"].argmax(-1) == labels).float().mean()))


def test_a_traced_clip_splices_its_vision_tower():
    clip, clip_tl = px.load("builtin:shapes-clip", backend="nnsight"), px.load("builtin:shapes-clip")
    site, inputs = "visual.blocks.1.hook_resid_post", clip.example_inputs(2)
    inputs["image"] = torch.randn(2, 3, *clip.cfg.img_size, generator=torch.Generator().manual_seed(1))
    d = clip.cfg.d_model
    sae = random_sae("topk", d_in=d, d_sae=4 * d)
    name = f"{site}.hook_sae_acts_post"
    with torch.no_grad():
        with clip.trace(**inputs):
            clean = clip.output.save()
        with splice(clip, sae, site, use_error_term=True):
            out, cache = clip.run_with_cache(**inputs, names_filter=[name])
        with splice(clip_tl, sae, site, use_error_term=True):
            _, tl_cache = clip_tl.run_with_cache(inputs["image"], inputs["text"])
    for got, want in zip(out, clean):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cache[name].abs().max() > 0
    torch.testing.assert_close(cache[name], tl_cache[name], atol=1e-5, rtol=0)
    assert name not in clip.site_names


def test_downstream_on_a_traced_clip_equals_tl():
    """A traced CLIP's sites are `visual.`-prefixed: downstream splices there and gives the
    HookedCLIP's scores."""
    from tests.support.clip_models import small_open_clip

    src = small_open_clip("ViT-B-16", seed=3)
    tl, traced = px.load(src), px.load(src, backend="nnsight")
    for m in (tl, traced):
        m.use_zero_shot_head(["a cat", "a dog", "a car"], ["{}"])
    images = torch.randn(4, 3, *tl.visual.cfg.img_size, generator=torch.Generator().manual_seed(0))
    sae = random_sae("topk", d_in=tl.visual.cfg.d_model, d_sae=64)
    want = downstream(tl, sae, "blocks.1.hook_resid_post", images)
    got = downstream(traced, sae, "blocks.1.hook_resid_post", images)
    assert got.keys() == want.keys() and want["kl_spliced"] > 1e-3
    for key in want:  # kl_recovered is a ratio of two KLs: relative
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
