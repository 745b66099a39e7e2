"""The analysis layer on a traced Hugging Face SigLIP (nnsight backend) equals the same call on
its TL conversion within 1e-5: small random `SiglipForImageClassification` (a classifier head:
lens, DLA, attention maps, gradients, patching) and `SiglipModel` (its attention-pool head:
rollout and high-norm tokens; the CLIP decomposition is refused by name on both backends).
Every parameter is randomised; each comparison also checks that a model with other weights
differs, so it can fail."""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from prisma_ext.errors import PrismaError
from tests.support.hf_models import small_siglip

ATOL = 1e-5


def images(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def classifier():
    """(HookedViT, TracedSiglipClassifier, HookedViT of other weights) of a SigLIP classifier."""
    def build(seed):
        return small_siglip("SiglipForImageClassification", seed=seed, vision=dict(vision_use_head=False))
    src = build(3)
    return px.load(src), px.load(src, backend="nnsight"), px.load(build(4))


def same(name, got, want, far) -> None:
    got, want, far = (x if isinstance(x, torch.Tensor) else x.values for x in (got, want, far))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=name)
    assert (far - want).abs().max() > 100 * ATOL, f"{name}: the comparison cannot tell models apart"


def test_lens_attribution_and_attention(classifier):
    tl, traced, other = classifier
    x = images(1)
    assert type(traced).__name__ == "TracedSiglipClassifier" and tl.cfg.norm_type == "layernorm"
    for name, call in {
        "logit_lens": lambda m: px.logit_lens(m, x),
        "dla": lambda m: px.direct_logit_attribution(m, x, 1, by=("layer", "head")),
        "rollout": lambda m: px.attention_rollout(m, x),
        "gradient_attention": lambda m: px.gradient_attention(m, x, px.LogitDiff(0, 2)),
    }.items():
        same(name, call(traced), call(tl), call(other))


def test_patching(classifier):
    tl, traced, other = classifier
    clean, corrupted = images(1), images(2)

    def sweep(model):
        return px.activation_patching(model, clean, corrupted, px.LogitDiff(0, 1), sites=["resid_pre", "z"],
                                      positions="patches", progress=False)

    got, want, far = sweep(traced), sweep(tl), sweep(other)
    for site in want:
        same(f"patching {site}", got[site], want[site], far[site])
    got, want, far = (px.attribution_patching(m, clean, corrupted, px.LogitDiff(0, 1)) for m in (traced, tl, other))
    for site in want:
        same(f"attribution_patching {site}", got[site], want[site], far[site])


def test_a_siglip_with_its_attention_pool_head():
    src, far_src = small_siglip("SiglipModel", seed=5), small_siglip("SiglipModel", seed=6)
    tl, traced, other = px.load(src), px.load(src, backend="nnsight"), px.load(far_src)
    x = images(3)
    same("rollout", px.attention_rollout(traced, x), px.attention_rollout(tl, x), px.attention_rollout(other, x))
    got, want = px.high_norm_tokens(traced, x, factor=1.5), px.high_norm_tokens(tl, x, factor=1.5)
    torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)
    for model in (tl, traced):
        with pytest.raises(PrismaError, match="attention head"):
            px.clip_decomposition(model, x)
