"""The CLIP figures (prisma_ext.viz.clip) plot exactly their result's values, arranged as they say:
results built by hand with a non-square layer x head count, a non-square patch grid and values
that differ everywhere (so a transposed grid, a mirrored patch grid or a wrong text or image
index fails), then each figure once on the built-in CLIP's own results."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from prisma_ext.analysis.result import AnalysisResult
from prisma_ext.errors import InputError
from prisma_ext.layout import TokenLayout
from prisma_ext.viz import clip as vc

LAYOUT = TokenLayout(1, 0, 0, (2, 3), (4, 4), (8, 12))  # 2 x 3 patches of 4 x 4 pixels, one CLS token
B, L, H, T = 2, 3, 5, 2  # images, layers, heads, texts


def distinct(*shape: int, seed: int = 0) -> torch.Tensor:
    """Values that differ at every index (a permutation of a spread range, shuffled)."""
    n = int(np.prod(shape))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).double()
    return (perm / n - 0.4).reshape(shape)


def result(method: str, values: torch.Tensor, dims: tuple[str, ...], meta=None, parts=None, coords=None):
    return AnalysisResult(method, values, dims, LAYOUT, None, coords or {}, meta or {}, parts or {})


def z_of(fig, kind: str = "heatmap", i: int = 0) -> np.ndarray:
    traces = [t for t in fig.data if t.type == kind]
    return np.asarray(traces[i].z, dtype=float)


# ------------------------------------------------------------------------------- decomposition


@pytest.fixture
def scores() -> AnalysisResult:
    heads = distinct(B, L, H, T, seed=1)
    mlp, bias = distinct(B, L, T, seed=2), distinct(B, L, T, seed=3) / 10
    embedding, constant = distinct(B, T, seed=4), distinct(B, T, seed=5) / 100
    score = heads.sum((1, 2)) + mlp.sum(1) + bias.sum(1) + embedding + constant
    meta = {"texts": ["a red circle", "a blue square"], "score": score, "scale": "cosine"}
    coords = {"text": meta["texts"]}
    part = {name: result(f"decomposition_scores/{name}", v, dims, meta, coords=coords) for name, v, dims in (
        ("mlp", mlp, ("batch", "layer", "text")), ("attn_bias", bias, ("batch", "layer", "text")),
        ("embedding", embedding, ("batch", "text")), ("constant", constant, ("batch", "text")))}
    return result("decomposition_scores", heads, ("batch", "layer", "head", "text"), meta, part, coords)


def test_the_decomposition_figure_plots_layer_by_head_and_the_other_parts_adding_to_the_score(scores):
    fig = vc.decomposition_figure(scores, text="a blue square", batch=1)
    z = z_of(fig)
    assert z.shape == (L, H)  # layers are rows, heads columns
    np.testing.assert_array_equal(z, scores.values[1, :, :, 1].numpy())
    assert list(fig.data[0].y) == ["L0", "L1", "L2"] and list(fig.data[0].x) == [f"H{h}" for h in range(H)]
    assert fig.layout.yaxis.autorange == "reversed"  # layer 0 at the top
    bars = np.asarray(fig.data[1].y, dtype=float)
    expected = np.concatenate([scores.part("mlp").values[1, :, 1], scores.part("attn_bias").values[1, :, 1],
                               scores.part("embedding").values[1, 1:2], scores.part("constant").values[1, 1:2]])
    np.testing.assert_array_equal(bars, expected)
    assert list(fig.data[1].x[:L]) == ["L0 MLP", "L1 MLP", "L2 MLP"] and list(fig.data[1].x[-2:]) == [
        "embedding", "constant"]
    score = float(scores.meta["score"][1, 1])
    assert abs(z.sum() + bars.sum() - score) < 1e-12
    assert fig.layout.meta["score"] == pytest.approx(score) and fig.layout.meta["text"] == "a blue square"
    assert f"{score:.4f}" in fig.layout.title.text and "'a blue square' (image 1)" in fig.layout.title.text
    np.testing.assert_array_equal(z_of(vc.decomposition_figure(scores, text=1, batch=1)), z)


def test_the_decomposition_figure_without_an_image_shows_the_batch_mean(scores):
    fig = vc.decomposition_figure(scores)  # text 0, mean over images
    np.testing.assert_allclose(z_of(fig), scores.values[..., 0].mean(0).numpy(), rtol=0, atol=1e-15)
    total = z_of(fig).sum() + np.sum(fig.data[1].y)
    assert abs(total - float(scores.meta["score"][:, 0].mean())) < 1e-12
    assert "mean over 2 images" in fig.layout.title.text
    with pytest.raises(InputError, match="no text 'a green star'"):
        vc.decomposition_figure(scores, text="a green star")
    with pytest.raises(InputError, match=r"batch must be an int in \[0, 2\)"):
        vc.decomposition_figure(scores, batch=2)


# ------------------------------------------------------------------------------- TextSpan


def span_result() -> AnalysisResult:
    explained = torch.tensor([[0.2, 0.5, 0.6, 0.65], [0.4, 0.9, float("nan"), float("nan")],
                              [0.1, 0.15, 0.3, 0.31]])
    texts = [["a ring", "a cross", "a red thing", "a photo"], ["a circle", "a square"],
             ["blue", "green", "a diamond", "a star"]]
    coords = {"head": ["L0H2", "L2H4", "L1H0"], "rank": [1, 2, 3, 4]}
    return result("text_span", explained, ("head", "rank"), {"texts": texts, "n_images": 9, "n_texts": 20},
                  coords=coords)


def test_the_text_span_figure_draws_each_heads_curve_with_its_own_texts():
    span = span_result()
    fig = vc.text_span_figure(span)
    lines = [t for t in fig.data if t.type == "scatter"]
    assert [t.name for t in lines] == ["L0H2", "L2H4", "L1H0"]
    for i, line in enumerate(lines):
        np.testing.assert_array_equal(np.asarray(line.y, dtype=float), span.values[i].numpy())  # NaN after a stop
        assert list(line.x) == [1, 2, 3, 4]
        assert list(line.text) == span.meta["texts"][i] + [""] * (4 - len(span.meta["texts"][i]))
    table = next(t for t in fig.data if t.type == "table")
    columns = table.cells.values
    assert list(columns[0]) == ["L0H2", "L2H4", "L1H0"]
    assert [list(c) for c in columns[1:]] == [["a ring", "a circle", "blue"], ["a cross", "a square", "green"],
                                             ["a red thing", "", "a diamond"], ["a photo", "", "a star"]]
    one = vc.text_span_figure(span, heads=["L1H0"])
    assert [t.name for t in one.data if t.type == "scatter"] == ["L1H0"]
    assert list(next(t for t in one.data if t.type == "table").cells.values[1]) == ["blue"]
    with pytest.raises(InputError, match="no head 'L9H9'"):
        vc.text_span_figure(span, heads=["L9H9"])


# ------------------------------------------------------------------------------- head ablation


def test_the_head_ablation_figure_plots_layer_by_head_and_the_layer_sweeps_against_clean():
    acc = distinct(L, H, seed=6) + 0.5
    parts = {name: result(f"head_ablation/{name}", distinct(L, seed=7 + i) + 0.5, ("layer",),
                          coords={"layer": ["L0", "L1", "L2"]})
             for i, name in enumerate(("layer", "from_layer", "up_to_layer"))}
    meta = {"clean_accuracy": 0.8125, "n_images": 16}
    abl = result("head_ablation", acc, ("layer", "head"), meta, parts,
                 {"layer": ["L0", "L1", "L2"], "head": [f"H{h}" for h in range(H)]})
    fig = vc.head_ablation_figure(abl)
    z = z_of(fig)
    assert z.shape == (L, H)
    np.testing.assert_array_equal(z, acc.numpy())
    assert list(fig.data[0].x) == [f"H{h}" for h in range(H)] and list(fig.data[0].y) == ["L0", "L1", "L2"]
    lines = {t.meta: t for t in fig.data if t.type == "scatter"}
    for name in ("layer", "from_layer", "up_to_layer"):
        np.testing.assert_array_equal(np.asarray(lines[name].y, dtype=float), parts[name].values.numpy())
        assert list(lines[name].x) == ["L0", "L1", "L2"]
    assert list(lines["clean"].y) == [0.8125] * L
    assert "81.2%" in fig.layout.title.text


# ------------------------------------------------------------------------------- segmentation


def seg_inputs():
    masks = torch.zeros(B, 8, 12, dtype=torch.bool)
    masks[1, 1:5, 6:11] = True  # off-centre, so a mirrored or transposed mask differs
    images = torch.rand(B, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    return masks, images


def test_the_segmentation_figure_puts_the_map_the_threshold_and_the_mask_on_the_grid():
    maps = distinct(B, 6, seed=8)
    seg = result("zero_shot_segmentation", maps, ("batch", "patch"),
                 {"texts": ["circle", "square"], "labels": torch.tensor([0, 1]), "score": distinct(B, 2)})
    masks, images = seg_inputs()
    fig = vc.segmentation_figure(seg, masks, images, batch=1)
    grid = maps[1].reshape(2, 3).numpy()  # row-major: patch 1 is row 0, column 1
    heat = [t for t in fig.data if t.type == "heatmap"]
    np.testing.assert_array_equal(np.asarray(heat[0].z, dtype=float), grid)
    np.testing.assert_array_equal(np.asarray(heat[1].z, dtype=float), (grid > grid.mean()).astype(float))
    np.testing.assert_array_equal(np.asarray(heat[2].z, dtype=float), masks[1].numpy().astype(float))
    k = heat[0].dx / 4  # the display's enlargement: a patch is 4 pixels, a mask cell one
    assert heat[0].x0 == 2 * k and heat[0].dy == 4 * k and heat[2].dx == k and heat[2].x0 == k / 2
    assert [t.type for t in fig.data][0] == "image"
    assert "'square'" in fig.layout.title.text  # image 1's own text
    bare = vc.segmentation_figure(seg, batch=0)  # no image, no mask: two panels, row 0 at the top
    assert len([t for t in bare.data if t.type == "heatmap"]) == 2 and bare.layout.yaxis.autorange == "reversed"
    np.testing.assert_array_equal(z_of(bare), maps[0].reshape(2, 3).numpy())


def test_the_segmentation_figure_picks_a_text_from_a_text_axis():
    maps = distinct(B, 3, 6, seed=9)
    score = torch.tensor([[0.1, 0.3, 0.2], [0.5, 0.1, 0.0]])
    seg = result("zero_shot_segmentation", maps, ("batch", "text", "patch"),
                 {"texts": ["a", "b", "c"], "score": score}, coords={"text": ["a", "b", "c"]})
    np.testing.assert_array_equal(z_of(vc.segmentation_figure(seg, batch=0)), maps[0, 1].reshape(2, 3).numpy())
    np.testing.assert_array_equal(z_of(vc.segmentation_figure(seg, batch=1)), maps[1, 0].reshape(2, 3).numpy())
    np.testing.assert_array_equal(z_of(vc.segmentation_figure(seg, batch=1, text="c")),
                                  maps[1, 2].reshape(2, 3).numpy())


# ------------------------------------------------------------------------------- high-norm tokens


def high_norm_result() -> AnalysisResult:
    norms = distinct(B, L, 7, seed=10) + 1
    norms[:, :, 0] = 100.0  # the CLS token: never a patch, never in the lines
    outliers = torch.zeros(B, L, 7)
    outliers[1, 2, 3] = outliers[0, 2, 3] = outliers[0, 2, 6] = 1.0  # patches 2 and 5 (row 0 col 2, row 1 col 2)
    counts = outliers[..., 1:].sum(0)
    meta = {"factor": 4.0, "threshold": distinct(B, L, seed=11) + 3, "layer": 2, "n_outliers": 3}
    parts = {"outliers": result("high_norm_tokens.outliers", outliers, ("batch", "layer", "token"), meta),
             "counts": result("high_norm_tokens.counts", counts, ("layer", "patch"), meta)}
    return result("high_norm_tokens", norms, ("batch", "layer", "token"), meta, parts,
                  {"layer": ["L0", "L1", "L2"]})


def test_the_high_norm_figure_plots_patch_norms_per_layer_and_the_outliers_on_the_grid():
    hn = high_norm_result()
    patches = hn.values[..., 1:].numpy()
    fig = vc.high_norm_figure(hn)  # every image; the first layer with an outlier
    lines = {t.meta: np.asarray(t.y, dtype=float) for t in fig.data if t.type == "scatter"}
    np.testing.assert_array_equal(lines["max"], patches.max((0, 2)))
    np.testing.assert_array_equal(lines["median"], np.median(patches.transpose(1, 0, 2).reshape(L, -1), -1))
    assert "threshold" not in lines  # a threshold is one image's
    np.testing.assert_array_equal(z_of(fig), [[0, 0, 2], [0, 0, 1]])
    one = vc.high_norm_figure(hn, batch=1, layer=2)
    lines = {t.meta: np.asarray(t.y, dtype=float) for t in one.data if t.type == "scatter"}
    np.testing.assert_array_equal(lines["max"], patches[1].max(-1))
    np.testing.assert_array_equal(lines["median"], np.median(patches[1], -1))
    np.testing.assert_array_equal(lines["threshold"], hn.meta["threshold"][1].numpy())
    np.testing.assert_array_equal(z_of(one), [[0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(z_of(vc.high_norm_figure(hn, layer=0)), np.zeros((2, 3)))
    assert "3 outliers" in fig.layout.title.text


# ------------------------------------------------------------------------------- test-time register


def test_the_register_figure_plots_the_readouts_attention_before_after_and_to_the_register():
    before, after = distinct(B, L, 2, 6, seed=12), distinct(B, L, 2, 6, seed=13)
    register = distinct(B, L, 2, seed=14) + 0.5
    meta = {"layer": 1, "neurons": [7, 3], "max_output_change": 0.002}
    dims = ("batch", "layer", "head", "patch")
    parts = {"attention_before": result("test_time_register.attention_before", before, dims, meta),
             "attention_after": result("test_time_register.attention_after", after, dims, meta),
             "register_attention": result("test_time_register.register_attention", register,
                                          ("batch", "layer", "head"), meta)}
    ttr = result("test_time_register", distinct(B, L, 7), ("batch", "layer", "token"), meta, parts,
                 {"layer": ["L0", "L1", "L2"]})
    fig = vc.test_time_register_figure(ttr, batch=1)  # the last layer
    np.testing.assert_allclose(z_of(fig, i=0), before[1, 2].mean(0).reshape(2, 3).numpy(), rtol=0, atol=1e-15)
    np.testing.assert_allclose(z_of(fig, i=1), after[1, 2].mean(0).reshape(2, 3).numpy(), rtol=0, atol=1e-15)
    share = next(t for t in fig.data if t.type == "scatter")
    np.testing.assert_allclose(np.asarray(share.y, dtype=float), register[1].mean(-1).numpy(), rtol=0, atol=1e-15)
    assert list(share.x) == ["L0", "L1", "L2"]
    np.testing.assert_allclose(z_of(vc.test_time_register_figure(ttr, layer=0, batch=0), i=1),
                               after[0, 0].mean(0).reshape(2, 3).numpy(), rtol=0, atol=1e-15)
    assert "neurons 7, 3 moved at L1" in fig.layout.title.text


# ------------------------------------------------------------------------------- refusals, imports


FIGURES = {"decomposition_figure": "decomposition_scores", "text_span_figure": "px.text_span",
           "head_ablation_figure": "px.head_ablation", "segmentation_figure": "px.zero_shot_segmentation",
           "high_norm_figure": "px.high_norm_tokens", "test_time_register_figure": "px.test_time_register"}


@pytest.mark.parametrize("name", list(FIGURES))
def test_each_figure_refuses_another_methods_result_naming_what_it_expected(name):
    other = span_result() if name != "text_span_figure" else high_norm_result()
    with pytest.raises(InputError, match=rf"{name}: expected the result of {FIGURES[name]}.*got '{other.method}'"):
        getattr(vc, name)(other)
    with pytest.raises(InputError, match=rf"{name}: expected the result of .*got Tensor"):
        getattr(vc, name)(torch.zeros(3))


def test_a_clip_decomposition_is_refused_until_it_is_scored_against_texts():
    dec = result("clip_decomposition", torch.zeros(1, L, H, 4), ("batch", "layer", "head", "embed"))
    with pytest.raises(InputError, match=r"decomposition_scores\(px.clip_decomposition"):
        vc.decomposition_figure(dec)


def test_importing_the_figures_does_not_import_plotly():
    code = "import sys, prisma_ext, prisma_ext.viz.clip; assert 'plotly' not in sys.modules, 'plotly imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


# ------------------------------------------------------------------------------- on the built-in CLIP


@pytest.fixture(scope="module")
def builtin():
    import prisma_ext as px
    from prisma_ext import zoo

    clip = px.load("builtin:shapes-clip")
    scenes = zoo.heldout("shapes-clip", n=12, seed=31)
    return clip, scenes, zoo.normalize(scenes.images, "shapes-clip")


def test_every_figure_takes_its_methods_own_result_on_the_builtin_clip(builtin):
    import torch.nn.functional as F

    import prisma_ext as px
    from prisma_ext import zoo
    from prisma_ext.analysis.clip_decomposition import decomposition_scores

    clip, scenes, x = builtin
    names, templates = list(scenes.class_names), zoo.zero_shot_templates()
    texts = ["a ring", "a photo of a cross"]
    scores = decomposition_scores(px.clip_decomposition(clip, x[:3], tokens=False), clip, texts)
    fig = vc.decomposition_figure(scores, text=1, batch=2)
    with torch.no_grad():
        cosine = float(F.cosine_similarity(clip.encode_image(x[2:3]), clip.encode_text(texts[1:])))
    assert abs(z_of(fig).sum() + np.sum(fig.data[1].y) - cosine) < 1e-4  # the figure adds up to CLIP's cosine
    np.testing.assert_array_equal(z_of(fig), scores.values[2, :, :, 1].double().numpy())

    prompts = [t.format(c) for c in names for t in templates]
    span = px.text_span(clip, x, prompts, heads=[(3, 0), (1, 2)], k=2)
    lines = [t for t in vc.text_span_figure(span).data if t.type == "scatter"]
    assert [list(t.text) for t in lines] == span.meta["texts"]

    ablation = px.head_ablation(clip, x, scenes.labels, names, templates)
    np.testing.assert_array_equal(z_of(vc.head_ablation_figure(ablation)), ablation.values.double().numpy())

    seg = px.zero_shot_segmentation(clip, x[:2], names, labels=scenes.labels[:2])
    fig = vc.segmentation_figure(seg, scenes.masks[:2], scenes.images[:2], batch=1)
    np.testing.assert_array_equal(z_of(fig), seg.values[1].reshape(8, 8).double().numpy())

    hn = px.high_norm_tokens(clip, x)
    np.testing.assert_array_equal(next(t.y for t in vc.high_norm_figure(hn).data if t.meta == "max"),
                                  hn.values[..., 1:].double().amax((0, 2)).numpy())

    ttr = px.test_time_register(clip, x[:2], [0, 1], layer=1)
    share = next(t for t in vc.test_time_register_figure(ttr).data if t.type == "scatter")
    np.testing.assert_allclose(share.y, ttr.part("register_attention").values[0].double().mean(-1).numpy())
    assert share.y[0] == share.y[1] == 0  # masked until the register holds the moved activations
