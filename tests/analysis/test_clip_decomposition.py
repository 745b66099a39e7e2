"""px.clip_decomposition (CLIP's image embedding as a sum of heads, tokens, MLPs and the embedding)
and px.text_span (the greedy TextSpan basis of a head), on the TL backend."""

from __future__ import annotations

import copy

import pytest
import torch

import prisma_ext as px
from prisma_ext.analysis import clip_decomposition as cd
from prisma_ext.analysis.clip_decomposition import decomposition_scores, total_of
from prisma_ext.analysis.text_span import span_basis
from prisma_ext.errors import IdentityError, InputError, MissingSiteError, PrismaError
from tests.support.clip_models import small_open_clip

TEXTS = ["a red circle", "a blue square", "a green triangle", "a photo of a dog"]


@pytest.fixture(scope="module")
def random_clip():
    """open_clip ViT-B-16 shrunk, every parameter random (ln_post's weight and bias, proj included);
    open_clip's projection has no bias, so the hooked one gets a random one too."""
    clip = px.load(small_open_clip("ViT-B-16", seed=3))
    with torch.no_grad():
        bias = clip.visual.proj.bias
        bias.copy_(0.2 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(4)))
    return clip


@pytest.fixture(scope="module")
def shapes_clip():
    return px.load("builtin:shapes-clip")


def images_for(clip, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *clip.visual.cfg.img_size, generator=gen)


def _miss(result, clip, images):
    with torch.no_grad():
        return float((total_of(result) - clip.encode_image(images)).abs().max())


@pytest.mark.parametrize("which", ["random_clip", "shapes_clip"])
def test_the_parts_sum_to_the_image_embedding(which, request):
    clip = request.getfixturevalue(which)
    images = images_for(clip)
    result = px.clip_decomposition(clip, images)
    cfg = clip.visual.cfg
    n, L, H, E = images.shape[0], cfg.n_layers, cfg.n_heads, cfg.d_proj
    assert result.dims == ("batch", "layer", "head", "embed") and result.shape == (n, L, H, E)
    token = result.part("token")
    assert token.shape == (n, L, H, cfg.layout.n_tokens, E)
    assert result.part("mlp").shape == (n, L, E) and result.part("attn_bias").shape == (n, L, E)
    assert result.part("embedding").shape == (n, E) and result.part("constant").shape == (n, E)
    assert _miss(result, clip, images) < 1e-4
    assert result.meta["max_error"] < 1e-4
    torch.testing.assert_close(token.values.sum(3), result.values, atol=1e-5, rtol=0)
    # every part matters here: the check would notice any one of them missing
    embed = clip.encode_image(images).detach()
    size = embed.abs().max()
    for name in ("mlp", "attn_bias", "embedding", "constant"):
        assert result.part(name).values.abs().max() > 1e-3 * size, name
    assert result.values.abs().max() > 1e-3 * size


def test_random_weights_really_are_random(random_clip):
    ln = random_clip.visual.ln_final
    assert (ln.w - 1).abs().max() > 0.1 and ln.b.abs().max() > 0.05
    assert random_clip.visual.proj.bias.abs().max() > 0.05


def test_without_tokens_and_in_chunks_the_heads_are_the_same(random_clip):
    images = images_for(random_clip, n=5)
    full = px.clip_decomposition(random_clip, images)
    light = px.clip_decomposition(random_clip, images, tokens=False, batch_size=2)
    assert "token" not in light.parts and light.meta["max_error"] < 1e-4
    torch.testing.assert_close(light.values, full.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(light.part("mlp").values, full.part("mlp").values, atol=1e-5, rtol=0)


def test_folded_final_norm_sums_too():
    clip = px.load(small_open_clip("ViT-B-32", seed=5), fold_ln=True)
    images = images_for(clip, n=3)
    result = px.clip_decomposition(clip, images, tokens=False)
    assert _miss(result, clip, images) < 1e-4


def test_an_average_pool_tower_sums_over_every_patch_query():
    """No CLS: the embedding reads the mean of the patch tokens, each with its own frozen scale."""
    from open_clip.model import CLIP

    from tests.support.clip_models import shrunk_open_clip_cfg
    from tests.support.models import randomize_

    cfg = shrunk_open_clip_cfg("ViT-B-16")
    cfg["vision_cfg"]["pool_type"] = "avg"
    clip = px.load(randomize_(CLIP(**cfg).eval(), 7))
    assert clip.visual.cfg.global_pool == "avg"
    images = images_for(clip, n=3)
    result = px.clip_decomposition(clip, images)
    assert _miss(result, clip, images) < 1e-4
    torch.testing.assert_close(result.part("token").values.sum(3), result.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mutation", ["no_centring", "no_bias", "unfrozen_scale"])
def test_a_broken_readout_map_is_caught(random_clip, monkeypatch, mutation):
    """The identity the tests rest on notices a plausible bug (the method raises IdentityError)."""
    real = cd._readout_map

    def broken(backend):
        D, const = real(backend)
        if mutation == "no_centring":
            w, _ = backend.readout.affine()
            D = (backend.vit.proj.weight * w).detach()
        elif mutation == "no_bias":
            const = backend.vit.proj.bias.detach()  # the final norm's bias left out
        else:  # a scale off by 1%
            D = D * 1.01
        return D, const

    monkeypatch.setattr(cd, "_readout_map", broken)
    with pytest.raises(IdentityError, match="misses clip.encode_image"):
        px.clip_decomposition(random_clip, images_for(random_clip))


def test_mean_ablating_every_head_gives_the_mean_of_their_parts(random_clip):
    images = images_for(random_clip, n=6)
    result = px.clip_decomposition(random_clip, images)
    embed = result.meta["image_embedding"]
    heads = result.values  # [batch, layer, head, embed]
    rest = embed - heads.sum((1, 2))  # everything but the heads
    ablated = rest + heads.mean(0).sum((0, 1))  # each head replaced by its mean over the images
    torch.testing.assert_close(ablated.mean(0), embed.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(ablated - rest, (embed - rest).mean(0).expand_as(embed), atol=1e-5, rtol=0)
    # the same through the per-token parts
    tokens = result.part("token").values
    torch.testing.assert_close(rest + tokens.mean(0).sum((0, 1, 2)), ablated, atol=1e-5, rtol=0)
    assert (ablated - embed).abs().max() > 1e-3  # the heads do vary over the images


def test_scores_sum_to_the_cosine_and_match_dla(shapes_clip):
    images = images_for(shapes_clip, n=3)
    result = px.clip_decomposition(shapes_clip, images)
    scores = decomposition_scores(result, shapes_clip, TEXTS)
    assert scores.dims == ("batch", "layer", "head", "text") and scores.labels("text") == TEXTS
    with torch.no_grad():
        cos = shapes_clip.encode_image(images, normalize=True) @ shapes_clip.encode_text(TEXTS, normalize=True).T
    torch.testing.assert_close(total_of(scores), cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.meta["score"], cos, atol=1e-5, rtol=0)
    dots = decomposition_scores(result, shapes_clip, TEXTS, scale="dot")
    norm = result.meta["image_embedding"].norm(dim=-1)
    torch.testing.assert_close(dots.values, scores.values * norm[:, None, None, None], atol=1e-5, rtol=1e-5)
    # direct logit attribution of the cosine (image norm frozen) splits heads the same way
    dla = px.direct_logit_attribution(shapes_clip, images, px.ImageTextScore([TEXTS[1]], scale=1.0))
    torch.testing.assert_close(dla.part("head").values, scores.values[..., 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(dla.part("source").values, scores.part("token").values[..., 1], atol=1e-5, rtol=0)


def test_text_span_recovers_a_head_built_from_three_texts():
    gen = torch.Generator().manual_seed(0)
    d, n_texts, n_images = 64, 20, 50
    bank = torch.nn.functional.normalize(torch.randn(n_texts, d, generator=gen), dim=-1)
    true = [7, 2, 13]
    coeffs = torch.randn(n_images, 3, generator=gen) * torch.tensor([3.0, 2.0, 1.0])
    outputs = coeffs @ bank[true] + 0.5  # an offset the centring removes
    basis = span_basis(outputs, bank, k=5)
    assert sorted(basis.indices[:3]) == sorted(true)
    assert basis.explained[2] == pytest.approx(1.0, abs=1e-6)
    assert basis.explained[0] < 0.99 and basis.explained[1] < 0.999  # each pick adds
    assert len(basis.indices) == 3  # nothing left to explain after three
    assert (basis.explained.diff() >= 0).all()


def test_text_span_rank_keeps_only_the_first_principal_directions():
    """A head varying strongly along one text and weakly along another: with rank=1 the texts are
    projected onto its first principal direction only, so the search stops after the strong text."""
    gen = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(20, 64, generator=gen), dim=-1)
    coeffs = torch.randn(40, 2, generator=gen) * torch.tensor([5.0, 0.5])
    outputs = coeffs @ bank[[7, 2]]
    assert span_basis(outputs, bank, k=3).indices == [7, 2]
    narrow = span_basis(outputs, bank, k=3, rank=1)
    assert narrow.indices == [7] and float(narrow.explained[0]) < 0.999


def test_text_span_on_a_model(shapes_clip):
    images = images_for(shapes_clip, n=8)
    bank = TEXTS + ["a yellow star", "a small shape", "a large shape", "a striped pattern"]
    result = px.text_span(shapes_clip, images, bank, heads=[(3, 0), (2, 1)], k=3)
    assert result.dims == ("head", "rank") and result.shape == (2, 3)
    assert result.labels("head") == ["L3H0", "L2H1"]
    assert all(len(t) == 3 and len(set(t)) == 3 and set(t) <= set(bank) for t in result.meta["texts"])
    ev = result.values
    assert ((ev > 0) & (ev <= 1 + 1e-6)).all() and (ev.diff(dim=1) >= -1e-9).all()
    # the first pick is the text the head's centred outputs vary most along
    heads = px.clip_decomposition(shapes_clip, images, tokens=False).values[:, 3, 0]
    centred = heads - heads.mean(0)
    with torch.no_grad():
        text = shapes_clip.encode_text(bank, normalize=True)
    assert result.meta["texts"][0][0] == bank[int((centred @ text.T).pow(2).sum(0).argmax())]
    table = result.to_dataframe()
    assert list(table.columns) == ["head", "rank", "text", "explained_variance"] and len(table) == 6
    assert px.text_span(shapes_clip, images, bank, heads=[(3, 0)], k=3, rank=2).meta["rank"] == 2
    with pytest.raises(InputError, match="rank"):
        px.text_span(shapes_clip, images, bank, heads=[(3, 0)], rank=0)
    assert table.iloc[0]["text"] == result.meta["texts"][0][0]


def test_bad_input(shapes_clip):
    images = images_for(shapes_clip, n=2)
    with pytest.raises(InputError, match="needs a HookedCLIP.*got HookedViT"):
        px.clip_decomposition(shapes_clip.visual, images)
    with pytest.raises(InputError, match="needs a HookedCLIP.*got Linear"):
        px.text_span(torch.nn.Linear(2, 2), images, TEXTS)
    with pytest.raises(InputError, match="text bank is empty"):
        px.text_span(shapes_clip, images, [], heads=[(0, 0)])
    long = "a very long description " * 10
    with pytest.raises(InputError, match="a very long description.*longer than the text tower's context of 16"):
        px.text_span(shapes_clip, images, ["a circle", long], heads=[(0, 0)])
    with pytest.raises(InputError, match="longer than the text tower's context"):
        decomposition_scores(px.clip_decomposition(shapes_clip, images, tokens=False), shapes_clip, [long])
    with pytest.raises(InputError, match="must be strings"):
        px.text_span(shapes_clip, images, ["a circle", 3], heads=[(0, 0)])
    with pytest.raises(InputError, match=r"\(layer, head\) pairs.*got \(4, 0\)"):
        px.text_span(shapes_clip, images, TEXTS, heads=[(4, 0)])
    with pytest.raises(InputError, match="k .* positive int"):
        px.text_span(shapes_clip, images, TEXTS, heads=[(0, 0)], k=0)
    with pytest.raises(InputError, match="at least 2 images"):
        px.text_span(shapes_clip, images[:1], TEXTS, heads=[(0, 0)])
    with pytest.raises(InputError, match="expected images"):
        px.clip_decomposition(shapes_clip, images[0])
    with pytest.raises(InputError, match="scale must be"):
        decomposition_scores(px.clip_decomposition(shapes_clip, images, tokens=False), shapes_clip, TEXTS,
                             scale="logit")


def test_a_tower_without_the_sites_is_refused(shapes_clip):
    clip = copy.deepcopy(shapes_clip)
    del clip.visual.hook_dict["blocks.1.hook_mlp_out"]
    with pytest.raises(MissingSiteError, match="blocks.1.hook_mlp_out"):
        px.clip_decomposition(clip, images_for(clip, n=2))


def test_an_attention_pool_tower_is_refused(shapes_clip):
    clip = copy.deepcopy(shapes_clip)
    clip.visual.cfg = clip.visual.cfg.replace(global_pool="map")
    with pytest.raises(PrismaError, match="attention head.*not linear"):
        px.clip_decomposition(clip, images_for(clip, n=2))
