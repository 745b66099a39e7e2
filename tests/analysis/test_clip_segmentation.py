"""px.zero_shot_segmentation (patch maps from CLIP's per-token decomposition) and
px.segmentation_scores (mIoU and pixel accuracy against exact masks)."""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from prisma_ext import zoo
from prisma_ext.analysis.segmentation import random_maps, upsample
from prisma_ext.errors import InputError

N = 96
MARGIN = 0.2  # measured: decomposition mIoU 0.65-0.68 vs random 0.29 (seeds 11, 12; 128 scenes)


@pytest.fixture(scope="module")
def clip():
    return px.load("builtin:shapes-clip")


@pytest.fixture(scope="module")
def scenes():
    s = zoo.heldout("shapes-clip", N, seed=31)
    return s, zoo.normalize(s.images, "shapes-clip")


@pytest.fixture(scope="module")
def maps(clip, scenes):
    s, x = scenes
    return px.zero_shot_segmentation(clip, x, list(s.class_names))


def test_maps_are_the_token_parts_summed_over_layers_and_heads(clip, scenes, maps):
    s, x = scenes
    names = list(s.class_names)
    assert maps.dims == ("batch", "text", "patch") and maps.shape == (N, 6, 64)
    own = px.zero_shot_segmentation(clip, x[:8], names, s.labels[:8])
    assert own.dims == ("batch", "patch")
    torch.testing.assert_close(own.values, maps.values[torch.arange(8), s.labels[:8]], atol=1e-5, rtol=0)
    dec = px.clip_decomposition(clip, x[:8])
    scores = px.analysis.clip_decomposition.decomposition_scores(dec, clip, names)
    cls_share = scores.part("token").values[:, :, :, 0].sum((1, 2))  # [batch, text]
    heads = scores.values.sum((1, 2))
    torch.testing.assert_close(maps.values[:8].sum(-1) + cls_share, heads, atol=1e-5, rtol=0)
    assert maps.grid().shape == (N, 6, 8, 8)


def test_a_perfect_map_scores_one_and_its_inverse_zero():
    gen = torch.Generator().manual_seed(0)
    grid = torch.rand(5, 8, 8, generator=gen)
    masks = upsample(grid > grid.mean((1, 2), keepdim=True), (64, 64))
    perfect = px.segmentation_scores(grid, masks)
    assert perfect.miou == perfect.pixel_accuracy == perfect.foreground_iou == 1.0
    inverse = px.segmentation_scores(-grid, masks)
    assert inverse.foreground_iou == inverse.pixel_accuracy == 0.0
    assert "above its image's mean" in perfect.rule


def test_decomposition_beats_random_and_a_mirrored_map_scores_lower(scenes, maps):
    s, _ = scenes
    own = maps.values[torch.arange(N), s.labels].reshape(N, 8, 8)
    ours = px.segmentation_scores(own, s.masks)
    chance = px.segmentation_scores(random_maps(N, (8, 8), seed=0), s.masks)
    assert ours.miou > chance.miou + MARGIN, (ours.miou, chance.miou)
    assert ours.pixel_accuracy > chance.pixel_accuracy + MARGIN
    for wrong in (own.transpose(1, 2), own.flip(1), own.flip(2)):  # a mixed-up grid
        assert px.segmentation_scores(wrong, s.masks).miou < ours.miou - 0.1
    # each image's map is higher on its object's patches than off them
    on = s.masks.reshape(N, 8, 8, 8, 8).any(4).any(2)  # [batch, rows, cols]: patches the object touches
    higher = [(own[i][on[i]].mean() > own[i][~on[i]].mean()).item() for i in range(N)]
    assert sum(higher) > 0.9 * N


def test_rollout_and_gradient_attention_on_the_same_rule(clip, scenes):
    s, x = scenes
    chance = px.segmentation_scores(random_maps(N, (8, 8), seed=1), s.masks).miou
    rollout = px.segmentation_scores(px.attention_rollout(clip, x), s.masks).miou
    texts = [s.class_names[i] for i in s.labels.tolist()]
    gradient = px.segmentation_scores(px.gradient_attention(clip, x, px.ImageTextScore(texts)), s.masks).miou
    assert rollout > chance + MARGIN and gradient > chance + MARGIN


def test_bad_input_is_refused(clip, scenes, maps):
    s, x = scenes
    with pytest.raises(InputError, match="text bank is empty"):
        px.zero_shot_segmentation(clip, x[:2], [])
    with pytest.raises(InputError, match="95 labels for 96 images"):
        px.zero_shot_segmentation(clip, x, list(s.class_names), s.labels[:-1])
    with pytest.raises(InputError, match="pick one text per image"):
        px.segmentation_scores(maps, s.masks)
    own = maps.select(text=0)
    with pytest.raises(InputError, match=r"masks \[batch, height, width\]"):
        px.segmentation_scores(own, s.masks[0])
    with pytest.raises(InputError, match="95 masks for 96 maps"):
        px.segmentation_scores(own, s.masks[:-1])
    with pytest.raises(InputError, match="do not tile"):
        px.segmentation_scores(own, s.masks[:, :60, :60])
    with pytest.raises(InputError, match=r"maps \[batch, rows, cols\]"):
        px.segmentation_scores(torch.zeros(N, 64), s.masks)
