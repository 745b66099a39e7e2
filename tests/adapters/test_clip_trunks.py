"""open_clip configs whose visual tower is a timm trunk (SigLIP, SigLIP 2, EVA-CLIP, PE-Core,
MobileCLIP's ViT, ...), with open_clip's own text tower: reproduced or refused by name.

ViT trunks are shrunk by timm itself (same model name and open_clip's arguments, fewer layers, a
narrower width, a two-by-two patch grid), every parameter randomised; a reproduced config matches
open_clip's encode_image, encode_text and logits (SigLIP's logit_bias included) within 1e-4 and
px.load's own check passes. Trunk families that are not ViTs are built without weights (meta
device) and must be refused, naming the family or feature.
"""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from prisma_ext.errors import UnsupportedModelError
from tests.support.clip_models import small_open_clip_timm, text_tokens_for

# refused families and features, by a pattern of the config name
REFUSED = {"convnext": "ConvNeXt", "MobileCLIP-S": "FastVit", "MobileCLIP2-S": "FastVit", "swin": "windowed",
           "ViTamin": "HybridEmbed", "MobileCLIP-B": "HybridEmbed", "MobileCLIP2-B": "HybridEmbed",
           "vit_relpos": "relative position", "EVA02-E-14": "post-norm"}


def trunk_configs() -> list[str]:
    import open_clip
    from open_clip.factory import get_model_config

    names = []
    for name in open_clip.list_models():
        cfg = get_model_config(name)
        if cfg.get("vision_cfg", {}).get("timm_model_name") and not cfg.get("text_cfg", {}).get("hf_model_name"):
            names.append(name)
    return names


NAMES = trunk_configs()


def refused_feature(name: str) -> str | None:
    return next((feature for pattern, feature in REFUSED.items() if name.startswith(pattern)), None)


def test_the_population_is_what_the_docs_report():
    import open_clip

    if open_clip.__version__ == "3.3.0":
        assert len(NAMES) == 76
        assert sum(refused_feature(n) is None for n in NAMES) == 38


# one config of each trunk family and refusal (tests/docs/test_parity.py checks every config)
SAMPLE = ["ViT-B-16-SigLIP", "ViT-SO400M-16-SigLIP2-256", "EVA02-B-16", "EVA01-g-14", "PE-Core-S-16-384",
          "MobileCLIP2-L-14", "vit_medium_patch16_gap_256", "ViT-SO400M-16-SigLIP-i18n-256", "convnext_base",
          "MobileCLIP-S1", "ViTamin-S", "swin_base_patch4_window7_224", "vit_relpos_medium_patch16_cls_224",
          "EVA02-E-14"]


@pytest.mark.parametrize("name", SAMPLE)
def test_trunk_config_is_reproduced_or_refused(name):
    feature = refused_feature(name)
    src = small_open_clip_timm(name, seed=len(name), on_meta=feature is not None)
    if feature is not None:
        with pytest.raises(UnsupportedModelError, match=feature):
            px.load(src)
        return
    clip = px.load(src)
    images = torch.randn(2, 3, *clip.visual.cfg.img_size, generator=torch.Generator().manual_seed(3))
    tokens = text_tokens_for(clip.text.cfg, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images), src.encode_image(images), atol=1e-4, rtol=0)
        torch.testing.assert_close(clip.encode_text(tokens), src.encode_text(tokens), atol=1e-4, rtol=0)
        ref, _ = src.get_logits(images, tokens)
        torch.testing.assert_close(clip(images, tokens), ref, atol=1e-4, rtol=1e-5)
    assert (clip.logit_bias is not None) == (getattr(src, "logit_bias", None) is not None)


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP2", "PE-Core-T-16-384", "EVA02-B-16", "vit_medium_patch16_gap_256",
                                  "ViT-SO400M-16-SigLIP-i18n-256"])
def test_trunk_sites_equal_across_backends(name):
    src = small_open_clip_timm(name, seed=2)
    hooked, traced = px.load(src), px.load(src, backend="nnsight")  # the nnsight load compares every site
    images = torch.randn(2, 3, *hooked.visual.cfg.img_size, generator=torch.Generator().manual_seed(4))
    tokens = text_tokens_for(hooked.text.cfg, batch=2)
    with torch.no_grad():
        _, nn_cache = traced.run_with_cache(images, tokens)
        _, tl_cache = hooked.run_with_cache(images, tokens)
    assert "visual.hook_image_embed" in nn_cache
    assert ("text.hook_text_embed" in nn_cache) == hasattr(src, "text")  # CLIP projects its text inline
    assert any(".attn.hook_pattern" in site for site in nn_cache)
    for site, value in nn_cache.items():
        torch.testing.assert_close(value, tl_cache[site], atol=1e-5, rtol=1e-4, msg=site)


def test_siglip_has_no_projection_and_keeps_its_bias():
    """SigLIP's image embedding is its attention-pooled token (no projection): represented as an
    identity projection, so the CLIP methods find `hook_image_embed`; its logit bias is kept."""
    src = small_open_clip_timm("ViT-B-16-SigLIP", seed=3)
    clip = px.load(src)
    assert clip.visual.cfg.global_pool == "map"
    torch.testing.assert_close(clip.visual.proj.weight, torch.eye(clip.visual.cfg.d_model))
    torch.testing.assert_close(clip.logit_bias, src.logit_bias.reshape(()))
