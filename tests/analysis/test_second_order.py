"""px.second_order_effects (a neuron's effect on CLIP's image embedding through the later attention
layers), px.neuron_texts and px.neuron_ablation, on the TL backend, against hand-run hooks on the
model's own forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import prisma_ext as px
from prisma_ext.analysis import second_order as so
from prisma_ext.analysis.neuron_ablation import VARIANTS
from prisma_ext.analysis.result import AnalysisResult
from prisma_ext.errors import IdentityError, InputError
from tests.support.clip_models import small_open_clip

NEURONS = [3, 17, 40, 41]


@pytest.fixture(scope="module")
def random_clip():
    """open_clip ViT-B-16 shrunk to 2 layers, 3 heads, every parameter random."""
    return px.load(small_open_clip("ViT-B-16", seed=5))


@pytest.fixture(scope="module")
def shapes_clip():
    return px.load("builtin:shapes-clip")


def images_for(clip, n=3, seed=0):
    return torch.randn(n, 3, *clip.visual.cfg.img_size, generator=torch.Generator().manual_seed(seed))


def hand_run_change(clip, images, layer, neurons, freeze_attn_out=False):
    """clean - ablated image embedding with `neurons` of `layer` zeroed and everything after it
    frozen at its clean value except the later attention layers' values (patterns, ln1 scales,
    MLP outputs, the final norm's scale frozen; with `freeze_attn_out`, the attention outputs
    too, leaving only the direct path). Plain TL hooks on the model's own forward."""
    vit = clip.visual
    n_layers = vit.cfg.n_layers
    later = range(layer + 1, n_layers)
    frozen = [f"blocks.{i}.attn.hook_pattern" for i in later] + [f"blocks.{i}.ln1.hook_scale" for i in later]
    frozen += [f"blocks.{i}.hook_mlp_out" for i in later] + ["ln_final.hook_scale"]
    if freeze_attn_out:
        frozen += [f"blocks.{i}.hook_attn_out" for i in later]
    with torch.no_grad():
        clean, cache = vit.run_with_cache(images, return_type="embeds", names_filter=lambda n: n in frozen)

        def zero(value, hook):
            value = value.clone()
            value[..., neurons] = 0
            return value

        hooks = [(f"blocks.{layer}.mlp.hook_post", zero)]
        hooks += [(name, lambda value, hook, name=name: cache[name]) for name in frozen]
        ablated = vit.run_with_hooks(images, return_type="embeds", fwd_hooks=hooks)
    return clean - ablated


@pytest.mark.parametrize("which,layer", [("random_clip", 0), ("shapes_clip", 2)])
def test_effects_equal_a_hand_run_ablation(which, layer, request):
    """At the last-but-one layer the only paths left once later MLPs are frozen are the direct one
    and one attention layer: zeroing the neurons changes the embedding by exactly their first- plus
    second-order effects (catches a transposed pattern, a missing norm weight or centring, a wrong
    scale, a head order mixed up)."""
    clip = request.getfixturevalue(which)
    images = images_for(clip)
    result = px.second_order_effects(clip, images, layer, NEURONS)
    assert result.dims == ("batch", "neuron", "embed")
    assert result.shape == (3, len(NEURONS), clip.visual.cfg.d_proj)
    first = result.part("first_order").values.sum(1)
    second = result.values.sum(1)
    direct = hand_run_change(clip, images, layer, NEURONS, freeze_attn_out=True)
    total = hand_run_change(clip, images, layer, NEURONS)
    torch.testing.assert_close(first, direct, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second, total - direct, atol=1e-5, rtol=1e-4)
    assert float(second.abs().max()) > 1e-3  # the test has something to compare
    assert result.meta["check_error"] < 1e-5


def test_by_layer_sums_to_the_values_and_chunks_agree(shapes_clip):
    images = images_for(shapes_clip, n=4)
    whole = px.second_order_effects(shapes_clip, images, 0, NEURONS, per_layer=True)
    by_layer = whole.part("by_layer")
    assert by_layer.dims == ("batch", "neuron", "layer", "embed") and by_layer.labels("layer") == ["L1", "L2", "L3"]
    torch.testing.assert_close(by_layer.values.sum(2), whole.values, atol=1e-6, rtol=0)
    chunked = px.second_order_effects(shapes_clip, images, 0, NEURONS, batch_size=3)
    torch.testing.assert_close(chunked.values, whole.values, atol=1e-6, rtol=0)
    one = px.second_order_effects(shapes_clip, images, 0, [NEURONS[2]])
    torch.testing.assert_close(one.values[:, 0], whole.values[:, 2], atol=1e-6, rtol=0)  # neurons in given order


def _reversed_heads(monkeypatch):
    init = so._Paths.__init__

    def broken(self, *args):
        init(self, *args)
        self.maps = {i: m.flip(0) for i, m in self.maps.items()}
    monkeypatch.setattr(so._Paths, "__init__", broken)


@pytest.mark.parametrize("mutation", ["unit_scale", "reversed_heads"])
def test_the_run_time_check_catches_a_broken_formula(random_clip, monkeypatch, mutation):
    """The check recomputes the values through the model's own attention, with the norm's own
    forward: a formula that drops the later norms' scale or mixes up the heads raises."""
    if mutation == "unit_scale":
        monkeypatch.setattr(so, "_norm_scale", lambda norm, x: torch.ones_like(x[..., :1]))
    else:
        _reversed_heads(monkeypatch)
    with pytest.raises(IdentityError, match="model's own attention"):
        px.second_order_effects(random_clip, images_for(random_clip), 0, NEURONS)


def test_neuron_texts_recover_a_planted_direction(shapes_clip):
    """Effects built as (random scale) x (0.8 t1 + 0.6 t2) of two texts of a bank, plus a little
    noise: the first direction is rank one and pursuit names t1 and t2 with coefficients in the
    planted ratio; a negated effect keeps the texts and flips no sign of the direction's reading."""
    bank = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a white ring", "a cyan cross"]
    text = px.analysis.clip_decomposition.text_embeddings(shapes_clip, bank, "test")
    planted = 0.8 * text[1] + 0.6 * text[4]
    gen = torch.Generator().manual_seed(0)
    scale = 1 + torch.rand(16, 1, generator=gen)
    values = torch.stack([scale * planted + 1e-4 * torch.randn(16, text.shape[1], generator=gen),
                          -scale * planted], 1)  # [16, 2 neurons, embed]
    effects = AnalysisResult("second_order_effects", values, ("batch", "neuron", "embed"), None, None,
                             {"neuron": ["7", "9"]}, {"layer": 1, "neurons": [7, 9]})
    out = px.neuron_texts(effects, shapes_clip, bank, k=2)
    assert out.values.shape == (2,) and float(out.values.min()) > 0.999
    for n, sign in ((0, 1), (1, -1)):
        assert sorted(out.meta["texts"][n]) == ["a blue square", "a white ring"]
        coef = dict(zip(out.meta["texts"][n], out.meta["coefficients"][n]))
        assert coef["a blue square"] / coef["a white ring"] == pytest.approx(0.8 / 0.6, rel=1e-2)
        assert sign * coef["a blue square"] > 0  # the direction points along the mean effect
        assert out.meta["explained"][n] > 0.999


def test_neuron_texts_on_a_model(shapes_clip):
    images = images_for(shapes_clip, n=6)
    effects = px.second_order_effects(shapes_clip, images, 1, NEURONS)
    out = px.neuron_texts(effects, shapes_clip, ["red", "green", "blue", "circle", "square"], k=3)
    assert out.labels("neuron") == [str(n) for n in NEURONS]
    assert all(len(t) == 3 for t in out.meta["texts"])
    assert all(0 <= e <= 1 + 1e-9 for e in out.meta["explained"])
    # each chosen text's cosine with the neuron's direction, recomputed
    direction = torch.linalg.svd(effects.values[:, 0].double(), full_matrices=False).Vh[0]
    direction = direction * torch.sign(effects.values[:, 0].double().mean(0) @ direction)
    text = F.normalize(shapes_clip.encode_text(out.meta["texts"][0]).double(), dim=-1)
    torch.testing.assert_close(torch.tensor(out.meta["cosine"][0], dtype=torch.double), text @ direction,
                               atol=1e-5, rtol=0)


def test_neuron_ablation_matches_hand_measurements(shapes_clip):
    from prisma_ext import zoo

    scenes = zoo.heldout("shapes-clip", n=24, seed=31)
    images, names = zoo.normalize(scenes.images, "shapes-clip"), list(scenes.class_names)
    templates = zoo.zero_shot_templates()
    result = px.neuron_ablation(shapes_clip, images, scenes.labels, names, templates, layers=[1])
    assert result.dims == ("layer", "variant") and result.labels("variant") == list(VARIANTS)
    classes = shapes_clip.zero_shot_classifier(names, templates)
    vit = shapes_clip.visual

    def accuracy(embed):
        return float(((embed @ classes.T).argmax(-1) == scenes.labels).float().mean())

    with torch.no_grad():
        site = "blocks.1.mlp.hook_post"
        clean, cache = vit.run_with_cache(images, return_type="embeds", names_filter=lambda n: n == site)
        mean = cache[site].mean(0, keepdim=True)
        ablated = vit.run_with_hooks(images, return_type="embeds", fwd_hooks=[
            ("blocks.1.mlp.hook_post", lambda v, hook: mean.expand_as(v))])
    effects = px.second_order_effects(shapes_clip, images, 1)
    first, second = effects.part("first_order").values.sum(1), effects.values.sum(1)
    want = [accuracy(clean - first + first.mean(0)), accuracy(clean - second + second.mean(0)),
            accuracy(clean - first - second + first.mean(0) + second.mean(0)), accuracy(ablated)]
    assert result.values[0].tolist() == pytest.approx(want, abs=1e-9)
    assert result.meta["clean_accuracy"] == pytest.approx(accuracy(clean), abs=1e-9)
    assert -1 <= result.meta["predicted_cosine"][0] <= 1 and result.meta["predicted_share"][0] > 0


def test_bad_input(shapes_clip, random_clip):
    images = images_for(shapes_clip, n=2)
    n_layers, d_mlp = shapes_clip.visual.cfg.n_layers, shapes_clip.visual.cfg.d_mlp
    with pytest.raises(InputError, match="last block"):
        px.second_order_effects(shapes_clip, images, n_layers - 1)
    for layer in (-1, n_layers, 1.0, True):
        with pytest.raises(InputError, match="layer must be an int"):
            px.second_order_effects(shapes_clip, images, layer)
    for neurons in ([], [d_mlp], [-1], [1, 1], ["3"]):
        with pytest.raises(InputError, match="neurons"):
            px.second_order_effects(shapes_clip, images, 0, neurons)
    with pytest.raises(InputError, match="HookedCLIP"):
        px.second_order_effects(px.load("builtin:shapes-vit"), images, 0)
    effects = px.second_order_effects(shapes_clip, images, 0, [1])
    with pytest.raises(InputError, match="second_order_effects"):
        px.neuron_texts(effects.part("first_order"), shapes_clip, ["red"])
    with pytest.raises(InputError, match="k"):
        px.neuron_texts(effects, shapes_clip, ["red"], k=0)
    with pytest.raises(InputError, match="empty"):
        px.neuron_texts(effects, shapes_clip, [])
    with pytest.raises(InputError, match="layers is empty"):
        px.neuron_ablation(shapes_clip, images, [0, 1], ["a", "b"], layers=[])
    with pytest.raises(InputError, match="at least 2 images"):
        px.neuron_ablation(shapes_clip, images[:1], [0], ["a", "b"])
    with pytest.raises(InputError, match="labels"):
        px.neuron_ablation(shapes_clip, images, [0], ["a", "b"])


@pytest.mark.parametrize("source", ["open_clip", "hf"])
def test_on_a_traced_clip_equal_tl(source):
    """The same effects, texts and ablation table from the source traced by nnsight."""
    from tests.support.clip_models import small_hf_clip

    src = small_open_clip("ViT-B-16", seed=5) if source == "open_clip" else small_hf_clip(seed=2)
    tl, traced = px.load(src), px.load(src, backend="nnsight")
    images = images_for(tl, n=4)
    want = px.second_order_effects(tl, images, 0, NEURONS, per_layer=True)
    got = px.second_order_effects(traced, images, 0, NEURONS, per_layer=True)
    assert got.meta["backend"] == "nnsight" and float(want.values.abs().max()) > 1e-3
    for name in (None, "first_order", "by_layer"):
        a, b = (r if name is None else r.part(name) for r in (got, want))
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
    names = ["a cat", "a dog", "a car"]
    ablated = [px.neuron_ablation(m, images, [0, 1, 2, 0], names, ["{}"]) for m in (traced, tl)]
    assert ablated[0].values.tolist() == ablated[1].values.tolist()
    assert ablated[0].meta["predicted_cosine"] == pytest.approx(ablated[1].meta["predicted_cosine"], abs=1e-5)
