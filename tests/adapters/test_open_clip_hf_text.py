"""open_clip configs whose text tower is a Hugging Face encoder (RoBERTa, XLM-R, mT5, NLLB):
traced by the nnsight backend with HookedCLIP's site names (checked against the encoder's own
hidden states and branch identities), refused by the TL backend with the feature named."""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from prisma_ext.errors import UnsupportedModelError
from prisma_ext.verification import VerificationError
from tests.support.clip_models import small_open_clip_hf_text, text_tokens_for

NAMES = ["roberta-ViT-B-32", "xlm-roberta-base-ViT-B-32", "xlm-roberta-large-ViT-H-14", "mt5-base-ViT-B-32",
         "mt5-xl-ViT-H-14", "nllb-clip-base", "nllb-clip-large", "nllb-clip-base-siglip", "nllb-clip-large-siglip"]
LAYOUTS = {"roberta-ViT-B-32": "bert", "mt5-base-ViT-B-32": "t5", "nllb-clip-base": "m2m100"}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def traced_pair(request):
    module = small_open_clip_hf_text(request.param, seed=5)
    return request.param, module, px.load(module, backend="nnsight")


def _run(traced, module, tokens):
    images = torch.randn(2, 3, *traced.cfg.img_size, generator=torch.Generator().manual_seed(1))
    return traced.run_with_cache(images, tokens)


@pytest.mark.parametrize("name", NAMES)
def test_every_hf_text_config_is_traced_and_refused_on_tl_by_name(name):
    module = small_open_clip_hf_text(name, seed=len(name))
    traced = px.load(module, backend="nnsight")  # verified: image sites against a conversion, text read once
    assert traced.towers == {"visual": "visual.", "text": "text."}
    with pytest.raises(UnsupportedModelError, match=r"HFTextEncoder .* not supported on the TL backend; "
                                                    r"backend='nnsight'"):
        px.load(module)


def test_text_sites_are_the_encoders_own_hidden_states(traced_pair):
    name, module, traced = traced_pair
    tokens = text_tokens_for(traced.text_cfg, batch=2, length=9)
    with torch.no_grad():
        _, cache = _run(traced, module, tokens)
        text = module.text
        mask = (tokens != text.config.pad_token_id).long()
        hf = text.transformer(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        want_embed = module.encode_text(tokens)
    n = traced.text_cfg.n_layers
    for i in range(n):
        torch.testing.assert_close(cache[f"text.blocks.{i}.hook_resid_pre"], hf.hidden_states[i])
    last = "text.ln_final.hook_normalized" if LAYOUTS[name] != "bert" else f"text.blocks.{n - 1}.hook_resid_post"
    torch.testing.assert_close(cache[last], hf.last_hidden_state)
    torch.testing.assert_close(cache["text.hook_text_embed"], want_embed)
    torch.testing.assert_close(text.proj(cache["text.hook_pooled"]), want_embed)


def test_branch_sites_add_up_to_the_stream(traced_pair):
    """Pre-norm: resid_pre + attn_out = resid_mid, resid_mid + mlp_out = resid_post; post-norm
    (BERT-like): the layer's own add & norm of the same pairs. z through the output projection is
    attn_out; the MLP's activation of its pre-activations (times the linear half, mT5) is mlp.hook_post."""
    name, module, traced = traced_pair
    tokens = text_tokens_for(traced.text_cfg, batch=2, length=9)
    with torch.no_grad():
        _, c = _run(traced, module, tokens)
        for i in range(traced.text_cfg.n_layers):
            b = f"text.blocks.{i}."
            pre, mid, post = c[b + "hook_resid_pre"], c[b + "hook_resid_mid"], c[b + "hook_resid_post"]
            attn, mlp, z = c[b + "hook_attn_out"], c[b + "hook_mlp_out"], c[b + "attn.hook_z"].flatten(-2)
            if LAYOUTS[name] == "bert":
                layer = module.text.transformer.encoder.layer[i]
                torch.testing.assert_close(layer.attention.output.LayerNorm(pre + attn), mid)
                torch.testing.assert_close(layer.output.LayerNorm(mid + mlp), post)
                torch.testing.assert_close(layer.attention.output.dense(z), attn)
                act = layer.intermediate.intermediate_act_fn
                torch.testing.assert_close(act(c[b + "mlp.hook_pre"]), c[b + "mlp.hook_post"])
            else:
                torch.testing.assert_close(pre + attn, mid)
                torch.testing.assert_close(mid + mlp, post)
            if LAYOUTS[name] == "t5":
                block = module.text.transformer.block[i]
                torch.testing.assert_close(block.layer[0].SelfAttention.o(z), attn)
                dense = block.layer[1].DenseReluDense
                torch.testing.assert_close(dense.act(c[b + "mlp.hook_pre"]) * c[b + "mlp.hook_pre_linear"],
                                           c[b + "mlp.hook_post"])
            if LAYOUTS[name] == "m2m100":
                layer = module.text.transformer.layers[i]
                torch.testing.assert_close(layer.self_attn.out_proj(z), attn)


def test_patching_a_text_site_matches_a_hook_on_the_source(traced_pair):
    name, module, traced = traced_pair
    tokens = text_tokens_for(traced.text_cfg, batch=2, length=9)
    layers = {"bert": "encoder.layer", "t5": "block", "m2m100": "layers"}[LAYOUTS[name]]
    layer = module.text.transformer.get_submodule(layers)[0]

    def scaled(_module, _inputs, output):
        if isinstance(output, tuple):
            return (output[0] * 0.5, *output[1:])
        return output * 0.5

    handle = layer.register_forward_hook(scaled)
    try:
        with torch.no_grad():
            want = module.encode_text(tokens)
    finally:
        handle.remove()
    with torch.no_grad(), traced.trace(torch.zeros(2, 3, *traced.cfg.img_size), tokens):
        resid = traced.site("text.blocks.0.hook_resid_post")
        traced.set_site("text.blocks.0.hook_resid_post", resid * 0.5)
        got = traced.site("text.hook_text_embed").save()
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(module.encode_text(tokens), traced.run_with_cache(
            torch.zeros(2, 3, *traced.cfg.img_size), tokens)[1]["text.hook_text_embed"])  # nothing left behind


def test_image_sites_are_still_verified_against_a_conversion(monkeypatch):
    """The text tower cannot be converted, so px.load converts the image tower alone: a wrong
    image-site map (block 0's output read where its MLP branch ends, before the residual add)
    is caught by name."""
    from prisma_ext.adapters.open_clip import OpenCLIPAdapter
    from prisma_ext.sitemaps.spec import Site

    module = small_open_clip_hf_text("xlm-roberta-base-ViT-B-32", seed=2)
    real = OpenCLIPAdapter.site_map

    def mirrored(self, model):
        sites = dict(real(self, model))
        sites["visual.blocks.0.hook_resid_post"] = Site("visual.transformer.resblocks.0.ls_2")
        return sites

    monkeypatch.setattr(OpenCLIPAdapter, "site_map", mirrored)
    with pytest.raises(VerificationError, match=r"visual\.blocks\.0\.hook_resid_post"):
        px.load(module, backend="nnsight")


def test_an_encoder_family_without_a_site_map_is_refused_by_name():
    module = small_open_clip_hf_text("roberta-ViT-B-32", seed=1)
    module.text.config.model_type = "electra"
    with pytest.raises(UnsupportedModelError, match=r"'electra' encoder is not supported; supported encoders: "
                                                    r"bert, m2m_100, mt5, roberta, xlm-roberta"):
        px.load(module, backend="nnsight")


def test_the_text_config_reads_the_encoder():
    traced = px.load(small_open_clip_hf_text("mt5-base-ViT-B-32", seed=1), backend="nnsight")
    cfg = traced.text_cfg
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_mlp) == (32, 2, 2, 16, 64)
    assert (cfg.pool, cfg.causal, cfg.norm_type, cfg.gated_mlp, cfg.context_length) == ("mean", False, "rmsnorm",
                                                                                          True, 77)
    with pytest.raises(UnsupportedModelError, match="text pooling 'mean' is not supported by the hooked text"):
        from prisma_ext.hooked.text import HookedTextTransformer

        HookedTextTransformer(cfg)
