"""Every supported timm variant, random weights: HookedViT reproduces timm's forward pass."""

import pytest
import torch

import prisma_ext as px
from tests.support.models import VARIANTS, images_for, small_timm

ATOL = 1e-4


def block_outputs(model, x):
    """Each timm block's output, read with plain torch forward hooks."""
    outs = []
    handles = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach())) for b in model.blocks]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, outs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_blocks_match_timm(variant):
    src = small_timm(variant)
    x = images_for(src)
    ref_logits, ref_blocks = block_outputs(src, x)
    assert ref_logits.abs().max() > 0.1  # the random head is not degenerate
    hooked = px.load(src)
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(x)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    for i, ref in enumerate(ref_blocks):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_post"], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("option", ["fold_ln", "center_writing_weights", "fold_value_biases",
                                    "use_attn_result", "all"])
def test_processing_options_keep_logits(variant, option):
    src = small_timm(variant, seed=3)
    x = images_for(src, seed=4)
    with torch.no_grad():
        ref = src(x)
    opts = dict(fold_ln=True, center_writing_weights=True, fold_value_biases=True,
                use_attn_result=True) if option == "all" else {option: True}
    hooked = px.load(src, **opts)
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), ref, atol=ATOL, rtol=0)


def test_processing_changes_what_it_says():
    src = small_timm("plain")
    x = images_for(src)
    plain = px.load(src)
    folded = px.load(src, fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    assert folded.blocks[0].ln1.w is None and folded.cfg.normalization_type == "LNPre"
    assert torch.all(folded.b_V == 0) and not torch.all(plain.b_V == 0)
    _, cache = folded.run_with_cache(x)
    for name in ("hook_embed", "blocks.0.hook_attn_out", "blocks.1.hook_mlp_out"):
        assert cache[name].mean(-1).abs().max() < 1e-5, name  # centred writes
    _, raw = plain.run_with_cache(x)
    assert raw["blocks.0.hook_attn_out"].mean(-1).abs().max() > 1e-3


def test_source_module_untouched():
    src = small_timm("dinov2_reg4")
    before = {k: v.clone() for k, v in src.state_dict().items()}
    px.load(src, fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    for k, v in src.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dynamic_img_size_interpolates_positions():
    src = small_timm("plain", dynamic_img_size=True)
    hooked = px.load(src)
    for size in [(48, 40), (32, 32), (16, 24)]:
        x = images_for(src, size=size)
        with torch.no_grad():
            torch.testing.assert_close(hooked(x), src(x), atol=ATOL, rtol=0)
        assert hooked.layout.for_image(*size).n_tokens == 1 + (size[0] // 8) * (size[1] // 8)


def test_dynamic_img_size_registers_no_embed_class():
    src = small_timm("dinov2_reg4", dynamic_img_size=True)
    hooked = px.load(src)
    x = images_for(src, size=(56, 28))
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), src(x), atol=ATOL, rtol=0)


def test_img_size_override_through_load():
    hooked = px.load("timm:vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=1,
                     embed_dim=24, num_heads=2)
    assert hooked.layout.grid == (4, 4) and hooked.layout.n_prefix == 5
    assert hooked.layout.prefix_names == ("cls", "reg0", "reg1", "reg2", "reg3")
