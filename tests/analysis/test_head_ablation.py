"""px.head_ablation: zero-shot accuracy of CLIP with heads mean-ablated through the decomposition."""

from __future__ import annotations

import copy

import pytest
import torch

import prisma_ext as px
from prisma_ext import zoo
from prisma_ext.analysis.clip_decomposition import total_of
from prisma_ext.analysis.head_ablation import OTHER_PARTS, mean_ablated
from prisma_ext.errors import InputError


@pytest.fixture(scope="module")
def clip():
    return px.load("builtin:shapes-clip")


@pytest.fixture(scope="module")
def scenes():
    s = zoo.heldout("shapes-clip", 160, seed=21)
    return s, zoo.normalize(s.images, "shapes-clip")


@pytest.fixture(scope="module")
def ablation(clip, scenes):
    s, x = scenes
    return px.head_ablation(clip, x, s.labels, list(s.class_names), zoo.zero_shot_templates())


def test_nothing_ablated_is_the_clips_own_zero_shot_accuracy(clip, scenes, ablation):
    s, x = scenes
    zoo.use_zero_shot_head(clip)
    with torch.no_grad():
        direct = float((clip.visual(x).argmax(-1) == s.labels).float().mean())
    assert ablation.meta["clean_accuracy"] == direct > 0.9
    installed = px.head_ablation(clip, x, s.labels)  # the installed head: the same classifier
    assert installed.meta["clean_accuracy"] == direct
    torch.testing.assert_close(installed.values, ablation.values, atol=0, rtol=0)
    biased = copy.deepcopy(clip)  # an installed head with a bias: still the tower's own accuracy
    with torch.no_grad():
        biased.visual.head.bias.copy_(torch.tensor([100.0, 0, 0, 0, 0, 0]))
        direct = float((biased.visual(x).argmax(-1) == s.labels).float().mean())
    assert px.head_ablation(biased, x, s.labels).meta["clean_accuracy"] == direct < 0.5


def test_mean_ablating_every_part_gives_the_mean_embedding(clip, scenes):
    _, x = scenes
    dec = px.clip_decomposition(clip, x[:32], tokens=False)
    embed = dec.meta["image_embedding"]
    torch.testing.assert_close(mean_ablated(dec), embed, atol=1e-4, rtol=0)
    every = torch.ones(dec.values.shape[1:3], dtype=torch.bool)
    heads_mean = total_of(dec) - dec.values.sum((1, 2)) + dec.values.mean(0).sum((0, 1))
    torch.testing.assert_close(mean_ablated(dec, every), heads_mean, atol=1e-5, rtol=0)
    full = mean_ablated(dec, every, OTHER_PARTS)
    torch.testing.assert_close(full, embed.mean(0).expand_as(full), atol=1e-4, rtol=0)
    assert (embed - embed.mean(0)).abs().max() > 0.1  # the images do differ


def test_accuracies_are_the_mean_ablated_ones_not_zero_ablated(clip, scenes, ablation):
    s, x = scenes
    dec = px.clip_decomposition(clip, x, tokens=False)
    classes = clip.zero_shot_classifier(list(s.class_names), zoo.zero_shot_templates())

    def acc(embeds):
        return float(((embeds @ classes.T).argmax(-1) == s.labels).float().mean())

    heads, bias = dec.values, dec.part("attn_bias").values
    mean_all = total_of(dec) - heads.sum((1, 2)) - bias.sum(1) + heads.mean(0).sum((0, 1)) + bias.mean(0).sum(0)
    zero_all = total_of(dec) - heads.sum((1, 2)) - bias.sum(1)
    assert ablation.part("from_layer").values[0] == acc(mean_all)
    assert abs(acc(zero_all) - acc(mean_all)) > 0.05  # zeros instead of means would be caught
    one = torch.zeros(heads.shape[1:3], dtype=torch.bool)
    one[3, 0] = True
    assert ablation.values[3, 0] == acc(mean_ablated(dec, one))


def test_the_tables_agree_and_late_layers_matter_more(ablation):
    clean = ablation.meta["clean_accuracy"]
    layer, onward, up_to = (ablation.part(n).values for n in ("layer", "from_layer", "up_to_layer"))
    assert ablation.shape == (4, 4) and layer.shape == onward.shape == up_to.shape == (4,)
    assert onward[-1] == layer[-1] and up_to[0] == layer[0] and up_to[-1] == onward[0]
    assert onward[0] < clean - 0.15  # every head at its mean: the embedding loses the class
    assert onward[-1] > clean - 0.05  # the last layer's heads alone barely matter here
    table = ablation.to_dataframe()
    assert list(table.columns) == ["layer", "head", "value"] and len(table) == 16
    assert table["layer"].iloc[0] == "L0" and table["head"].iloc[1] == "H1"
    assert ablation.plot() is not None and ablation.part("from_layer").plot() is not None


def test_bad_input_is_refused(clip, scenes):
    s, x = scenes
    names = list(s.class_names)
    with pytest.raises(InputError, match="159 labels for 160 images"):
        px.head_ablation(clip, x, s.labels[:-1], names)
    with pytest.raises(InputError, match="labels must index the 6"):
        px.head_ablation(clip, x, s.labels + 6, names)
    with pytest.raises(InputError, match="class_names must be a non-empty"):
        px.head_ablation(clip, x, s.labels, [])
    with pytest.raises(InputError, match="integer indices"):
        px.head_ablation(clip, x, s.labels.float(), names)
    with pytest.raises(InputError, match="needs a HookedCLIP"):
        px.head_ablation(clip.visual, x, s.labels, names)
    dec = px.clip_decomposition(clip, x[:4], tokens=False)
    with pytest.raises(InputError, match="bool mask"):
        mean_ablated(dec, torch.ones(3, 4, dtype=torch.bool))
