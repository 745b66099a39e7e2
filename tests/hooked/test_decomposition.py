"""TransformerLens's cache methods decompose a HookedViT's logits exactly (to 1e-4).

ViT-Prisma crashes here on any CLS model; these tests are the guard against that failure.
"""

import warnings

import pytest
import torch

import prisma_ext as px
from tests.support.models import images_for, small_timm

ATOL = 1e-4
LINEAR_READOUTS = ["plain", "deit_distilled", "dinov2_reg4", "clip_norm_pre", "gap_no_cls", "avg_fc_norm"]


def _setup(variant, **opts):
    src = small_timm(variant, seed=5)
    model = px.load(src, **opts)
    x = images_for(src, batch=3, seed=6)
    with torch.no_grad():
        logits, cache = model.run_with_cache(x)
    return model, logits, cache


@pytest.mark.parametrize("fold_ln", [True, False])
def test_tl_logit_attrs_on_cls_token_sum_to_logits(fold_ln):
    model, logits, cache = _setup("plain", fold_ln=fold_ln, center_writing_weights=fold_ln)
    classes = logits.argmax(-1)
    stack, labels = cache.decompose_resid(pos_slice=0, return_labels=True)
    assert labels[:2] == ["embed", "pos_embed"] and len(labels) == 2 + 2 * model.cfg.n_layers
    attrs = cache.logit_attrs(stack, tokens=classes, pos_slice=0)  # [component, batch]
    w, b = model._final_affine()
    bias = model.b_U[classes] + (b @ model.W_U[:, classes] if b is not None else 0)
    torch.testing.assert_close(attrs.sum(0) + bias, logits[torch.arange(3), classes], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.readout_bias(classes), bias, atol=ATOL, rtol=0)


def test_the_tl_habit_is_exact_folded_and_warns_unfolded():
    """`logit_attrs(...).sum(0) + b_U[c]` as a TL user writes it: exact with fold_ln=True; with
    fold_ln off the final norm's bias is missing, which a warning says (naming readout_bias, which
    closes the gap) instead of a silently short sum."""
    folded, logits, cache = _setup("plain", fold_ln=True)
    classes, rows = logits.argmax(-1), torch.arange(3)
    attrs = cache.logit_attrs(cache.decompose_resid(pos_slice=0), tokens=classes, pos_slice=0)
    torch.testing.assert_close(attrs.sum(0) + folded.b_U[classes], logits[rows, classes], atol=ATOL, rtol=0)

    model, logits, cache = _setup("plain")
    stack = cache.decompose_resid(pos_slice=0)
    with pytest.warns(UserWarning, match="readout_bias"):
        attrs = cache.logit_attrs(stack, tokens=classes, pos_slice=0)
    short = attrs.sum(0) + model.b_U[classes]
    assert (short - logits[rows, classes]).abs().max() > 10 * ATOL  # the gap the warning is about is real
    torch.testing.assert_close(attrs.sum(0) + model.readout_bias(classes), logits[rows, classes], atol=ATOL, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.logit_attrs(stack, tokens=classes, pos_slice=0)  # said once per model


def test_tl_full_resid_decomposition_and_head_results():
    model, logits, cache = _setup("plain", fold_ln=True, center_writing_weights=True)
    classes = logits.argmax(-1)
    rows = torch.arange(3)
    full, labels = cache.get_full_resid_decomposition(pos_slice=0, expand_neurons=True, return_labels=True)
    assert labels[-1] == "bias" and "L1H2" in labels and "L1N0" in labels
    attrs = cache.logit_attrs(full, tokens=classes, pos_slice=0)
    torch.testing.assert_close(attrs.sum(0) + model.b_U[classes], logits[rows, classes], atol=ATOL, rtol=0)
    heads = cache.stack_head_results(layer=-1, pos_slice=0)
    assert heads.shape == (model.cfg.n_layers * model.cfg.n_heads, 3, model.cfg.d_model)
    attn_out = torch.stack([cache["attn_out", i][:, 0] for i in range(model.cfg.n_layers)])
    b_O = torch.stack([model.blocks[i].attn.b_O for i in range(model.cfg.n_layers)])
    torch.testing.assert_close(heads.view(model.cfg.n_layers, model.cfg.n_heads, 3, -1).sum(1),
                               attn_out - b_O[:, None], atol=ATOL, rtol=0)


def test_accumulated_resid_logit_lens_last_layer_is_logits():
    model, logits, cache = _setup("clip_norm_pre", fold_ln=True)
    acc, labels = cache.accumulated_resid(apply_ln=True, return_labels=True, pos_slice=0)
    assert labels[-1] == "final_post" and acc.shape[0] == model.cfg.n_layers + 1
    torch.testing.assert_close(acc[-1] @ model.W_U + model.b_U, logits, atol=ATOL, rtol=0)


def test_apply_ln_to_stack_uses_cached_scale():
    model, logits, cache = _setup("dinov2_reg4", fold_ln=True)
    stack = cache.decompose_resid()  # [component, batch, pos, d]
    scaled = cache.apply_ln_to_stack(stack, layer=-1)
    torch.testing.assert_close(scaled.sum(0), cache["ln_final.hook_normalized"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", LINEAR_READOUTS)
@pytest.mark.parametrize("fold_ln", [True, False])
def test_token_readout_sums_to_logits_for_every_layout(variant, fold_ln):
    model, logits, cache = _setup(variant, fold_ln=fold_ln)
    classes = torch.tensor([0, 3, 6])
    stack = cache.decompose_resid()  # [component, batch, pos, d]
    scaled = cache.apply_ln_to_stack(stack, layer=-1)
    directions, bias = model.token_readout(classes)  # [batch, pos, d], [batch]
    per_token = (scaled * directions).sum(-1)  # [component, batch, pos]
    total = per_token.sum((0, 2)) + bias
    torch.testing.assert_close(total, logits[torch.arange(3), classes], atol=ATOL, rtol=0)


def test_tokens_to_residual_directions_shapes():
    model, _, _ = _setup("plain", fold_ln=True)
    assert model.tokens_to_residual_directions(2).shape == (model.cfg.d_model,)
    assert model.tokens_to_residual_directions(torch.tensor([1, 2])).shape == (2, model.cfg.d_model)
    torch.testing.assert_close(model.tokens_to_residual_directions(4), model.W_U[:, 4])


def test_map_head_refuses_linear_readout_with_a_reason():
    model, _, _ = _setup("siglip_map")
    with pytest.raises(px.errors.PrismaError, match="attention head"):
        model.tokens_to_residual_directions(0)
    assert model.W_U.shape == (model.cfg.d_model, model.cfg.n_classes)


def test_accumulated_bias_matches_block_biases():
    model, _, _ = _setup("plain")
    expected = model.blocks[0].attn.b_O + model.blocks[0].mlp.b_out + model.blocks[1].attn.b_O
    torch.testing.assert_close(model.accumulated_bias(1, mlp_input=True), expected)
    torch.testing.assert_close(model.accumulated_bias(0), torch.zeros(model.cfg.d_model))
