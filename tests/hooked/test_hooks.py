"""Hook points are real (editing them changes the output), TL's hook API works, nothing leaks."""

import pytest
import torch

import prisma_ext as px
from prisma_ext.errors import UnknownNameError
from tests.support.models import images_for, small_timm


@pytest.fixture(scope="module")
def model_and_x():
    src = small_timm("dinov2_reg4", seed=7)
    return px.load(src, use_attn_result=True), images_for(src, seed=8)


def no_hooks_left(model):
    return all(not hp._forward_hooks and not hp._backward_hooks and not hp.fwd_hooks and not hp.bwd_hooks
               for hp in model.hook_dict.values())


def test_explicit_attention_equals_sdpa(model_and_x):
    model, x = model_and_x
    with torch.no_grad():
        fast = model(x)
        seen = []
        slow = model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("hook_pattern"),
                                                   lambda t, hook: seen.append(hook.name))])
    assert len(seen) == model.cfg.n_layers
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores",
                                  "blocks.1.attn.hook_z", "blocks.1.attn.hook_result",
                                  "blocks.0.attn.hook_v", "blocks.1.hook_resid_mid",
                                  "blocks.0.mlp.hook_post", "blocks.1.ln2.hook_scale", "hook_embed",
                                  "hook_pos_embed", "ln_final.hook_normalized", "hook_pooled"])
def test_editing_a_site_changes_the_output(model_and_x, site):
    model, x = model_and_x

    def edit(t, hook):
        if hook.name.endswith("hook_pattern"):
            return torch.full_like(t, 1.0 / t.shape[-1])  # uniform attention
        if hook.name.endswith("hook_attn_scores"):
            return -t
        return t * 2.0

    with torch.no_grad():
        clean = model(x)
        edited = model.run_with_hooks(x, fwd_hooks=[(site, edit)])
    assert (edited - clean).abs().max() > 1e-3
    assert no_hooks_left(model)


def test_run_with_cache_shapes_and_layout(model_and_x):
    model, x = model_and_x
    _, cache = model.run_with_cache(x)
    lay = model.layout
    assert cache["blocks.0.hook_resid_pre"].shape == (2, lay.n_tokens, model.cfg.d_model)
    assert cache["pattern", 1].shape == (2, model.cfg.n_heads, lay.n_tokens, lay.n_tokens)
    assert cache["z", 0].shape == (2, lay.n_tokens, model.cfg.n_heads, model.cfg.d_head)
    assert cache["blocks.1.attn.hook_result"].shape == (2, lay.n_tokens, model.cfg.n_heads, model.cfg.d_model)
    torch.testing.assert_close(cache["pattern", 0].sum(-1), torch.ones(2, model.cfg.n_heads, lay.n_tokens))
    # DINOv2 (no_embed_class): CLS and registers get no position embedding, every patch does
    pos = cache["hook_pos_embed"]
    assert torch.all(pos[:, :5] == 0) and torch.all(pos[:, 5:].abs().sum(-1) > 0)


def test_cache_of_resid_only_keeps_fused_attention(model_and_x):
    model, x = model_and_x
    calls = []
    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        model.run_with_cache(x, names_filter=lambda n: "resid" in n)
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    assert len(calls) == model.cfg.n_layers


def test_backward_hooks_give_gradients(model_and_x):
    model, x = model_and_x
    grads = {}
    site = "blocks.1.hook_resid_pre"

    def save(grad, hook):
        grads[hook.name] = grad.detach()

    with model.hooks(bwd_hooks=[(site, save)]):
        logits = model(x)
        logits[:, 2].sum().backward()
    assert no_hooks_left(model)
    # the same gradient by plain autograd on the cached activation
    keep = {}

    def grab(t, hook):
        t.retain_grad()
        keep["t"] = t
        return t

    model.zero_grad()
    logits = model.run_with_hooks(x, fwd_hooks=[(site, grab)])
    logits[:, 2].sum().backward()
    torch.testing.assert_close(grads[site], keep["t"].grad)
    _, cache = model.run_with_cache(x, incl_bwd=False)
    assert grads[site].shape == cache[site].shape


def test_unknown_site_suggests_closest(model_and_x):
    model, x = model_and_x
    with pytest.raises(UnknownNameError, match="blocks.0.hook_resid_post"):
        model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_pots", lambda t, hook: t)])
    with pytest.raises(UnknownNameError, match="closest"):
        model.run_with_cache(x, names_filter=["blocks.0.attn.hook_patern"])
    assert no_hooks_left(model)


def test_a_hook_that_raises_leaves_no_hook_behind(model_and_x):
    model, x = model_and_x

    def boom(t, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        model.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, hook: t),
                                           ("blocks.1.hook_mlp_out", boom)])
    with pytest.raises(RuntimeError, match="user hook failed"), model.hooks(
            fwd_hooks=[("blocks.0.hook_resid_pre", boom)]):
        model.run_with_cache(x)
    assert no_hooks_left(model) and not model.is_caching
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_tl_weight_views_share_storage_and_shapes(model_and_x):
    model, x = model_and_x
    cfg = model.cfg
    attn = model.blocks[0].attn
    assert attn.W_Q.shape == (cfg.n_heads, cfg.d_model, cfg.d_head)
    assert attn.W_O.shape == (cfg.n_heads, cfg.d_head, cfg.d_model)
    assert model.W_Q.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert model.blocks[0].mlp.W_in.shape == (cfg.d_model, cfg.d_mlp)
    assert model.QK.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    assert model.OV.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    assert attn.W_Q.data_ptr() == attn.qkv.weight.data_ptr()
    # hook_q equals the normalised input times W_Q plus b_Q
    _, cache = model.run_with_cache(x)
    q = torch.einsum("bpd,hdk->bphk", cache["blocks.0.ln1.hook_normalized"], attn.W_Q) + attn.b_Q
    torch.testing.assert_close(q, cache["q", 0], atol=1e-5, rtol=0)
    z_out = torch.einsum("bphk,hkd->bpd", cache["z", 0], attn.W_O) + attn.b_O
    torch.testing.assert_close(z_out, cache["attn_out", 0], atol=1e-5, rtol=0)
