"""The report's work scaled to the model: patch blocks, a subset of layers, cheaper Captum and
shorter curves for a large model; the full versions for a cheap one or with --thorough."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prisma_ext.analysis.patching import activation_patching, resolve_positions
from prisma_ext.errors import PrismaError
from prisma_ext.hooked.config import ViTConfig
from prisma_ext.report.settings import Settings, settings_for


def _vit(d_model: int, n_layers: int, img: int, patch: int) -> ViTConfig:
    return ViTConfig(d_model=d_model, n_layers=n_layers, n_heads=d_model // 64, d_head=64, d_mlp=4 * d_model,
                     img_size=(img, img), patch_size=(patch, patch), n_classes=10)


def test_a_large_model_gets_coarser_sections_and_a_cheap_one_the_full_versions():
    base = settings_for(_vit(768, 12, 224, 16))
    assert not base.thorough and base.positions == "blocks:5" and base.layers == (0, 4, 7, 11)
    assert (base.heads, base.ig_steps, base.shap_samples, base.ablation_block, base.curve_steps) == (False, 4, 2, 5, 2)
    assert "--thorough" in base.describe()
    assert settings_for(_vit(768, 12, 224, 16), thorough=True) == Settings(thorough=True)
    assert settings_for(_vit(128, 4, 64, 8)) == Settings(thorough=True)  # the built-in models' size


def test_blocks_cover_every_patch_once_with_narrower_edges():
    from prisma_ext.layout import TokenLayout

    layout = TokenLayout(1, 0, 0, (4, 5), (8, 8), (32, 40))
    blocks = resolve_positions("blocks:3", layout)
    assert blocks.dim == "block" and blocks.labels == ["rows 0-2, cols 0-2", "rows 0-2, cols 3-4",
                                                       "rows 3-3, cols 0-2", "rows 3-3, cols 3-4"]
    assert sorted(t for g in blocks.groups for t in g) == list(range(1, 21))  # each patch once, CLS never
    assert blocks.groups[1] == [4, 5, 9, 10, 14, 15]  # row-major: rows 0-2 of columns 3-4
    assert len(resolve_positions("blocks", TokenLayout(1, 0, 0, (14, 14), (16, 16), (224, 224)))) == 49
    with pytest.raises(PrismaError, match="block size must be a positive integer"):
        resolve_positions("blocks:0", layout)


def test_patching_blocks_equals_patching_the_same_groups_by_hand(analysis_pair):
    p = analysis_pair("plain", batch=1)
    blocks = resolve_positions("blocks:2", p.tl.cfg.layout)
    by_name = activation_patching(p.tl, p.images, p.images.flip(-1), 0, sites=("resid_pre",), positions="blocks:2")
    by_hand = activation_patching(p.tl, p.images, p.images.flip(-1), 0, sites=("resid_pre",),
                                  positions=dict(zip(blocks.labels, blocks.groups)))
    torch.testing.assert_close(by_name["resid_pre"].values, by_hand["resid_pre"].values)


def test_the_coarse_sections_run_and_spread_each_block_over_its_patches(tmp_path):
    from prisma_ext.report import experiments
    from prisma_ext.report.build import prepare
    from prisma_ext.report.page import Page

    ctx = prepare("builtin:shapes-vit", image="builtin:red-circle")
    layers = ctx.cfg.n_layers
    ctx.settings = dataclasses.replace(Settings(thorough=False), positions="blocks:3", layers=(0, layers - 1),
                                       heads=False, minimal_counts=3, ig_steps=4, shap_samples=2, ablation_block=3,
                                       curve_steps=3)
    page = Page("t")
    experiments.patching(ctx, page)
    experiments.captum(ctx, page)
    groups, _ = experiments._positions(ctx)
    assert list(groups)[:ctx.layout.n_prefix] == list(ctx.layout.prefix_names)
    result = activation_patching(ctx.model, ctx.x, ctx.x_corrupted, experiments._metric_span(ctx)[0],
                                 sites=("resid_pre",), positions=groups, layers=[0])["resid_pre"]
    spread = experiments.per_patch(ctx, result)[0].reshape(ctx.layout.grid)
    first = result.values[0, 0, ctx.layout.n_prefix]  # the top-left 3 x 3 block
    assert torch.all(spread[:3, :3] == first) and not torch.all(spread == first)
    html = page.render()
    assert "Per-head patching (each head&#x27;s z at every token) runs with --thorough" in html or \
        "Per-head patching (each head's z at every token) runs with --thorough" in html
    assert "convergence delta" in html
