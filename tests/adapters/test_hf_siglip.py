"""Hugging Face SigLIP, SigLIP 2, MetaCLIP 2, AIMv2's image tower and CLIP's projected image tower:
the TL backend equals transformers' own forward (embeddings, logits with SigLIP's bias, every
layer), the nnsight backend's sites equal the TL backend's, saved folders load by their config,
and what is not reproduced is refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers

import prisma_ext as px
from prisma_ext.adapters import adapter_for
from prisma_ext.errors import UnsupportedModelError
from tests.support.hf_models import TEXT, VISION, randomized
from tests.support.hf_models import small_siglip as build

ATOL, SITE_ATOL = 1e-4, 1e-5
def images_for(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tokens_for(eos: int | None = None, batch: int = 3, seed: int = 2) -> torch.Tensor:
    """Token ids [batch, 12]; with `eos`, an end-of-text token mid-sequence, higher ids after it."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, TEXT["vocab_size"], (batch, TEXT["max_position_embeddings"]), generator=gen)
    if eos is not None:
        tokens[tokens == eos] = 50
        for row, end in enumerate((4, 7, 9)[:batch]):
            tokens[row, end] = eos
    return tokens


def image_args(model: torch.nn.Module, images: torch.Tensor) -> dict:
    """What the source's forward takes for images (SigLIP 2: NaFlex patches, mask and shapes). Imported
    here, after px.load has imported the adapters in the registry's order (the order of the
    supported classes other tests' refusal messages list)."""
    from prisma_ext.adapters.hf_siglip import naflex_inputs

    return naflex_inputs(images, 8) if type(model).__name__.startswith("Siglip2") else dict(pixel_values=images)


def assert_sites_equal(traced, hooked, cache: dict, tl_cache) -> None:
    assert list(cache) == traced.site_names
    for name, value in cache.items():
        torch.testing.assert_close(value, tl_cache[name], atol=SITE_ATOL, rtol=0, msg=name)


def assert_states_equal(tl_cache, states, prefix: str = "") -> None:
    """Block i's residual stream out is transformers' hidden state i + 1 (state 0: the embeddings)."""
    torch.testing.assert_close(tl_cache[f"{prefix}blocks.0.hook_resid_pre"], states[0], atol=ATOL, rtol=0)
    for i in range(len(states) - 1):
        torch.testing.assert_close(tl_cache[f"{prefix}blocks.{i}.hook_resid_post"], states[i + 1], atol=ATOL, rtol=0,
                                   msg=f"{prefix}block {i}")


# ---------------------------------------------------------------- both towers
@pytest.mark.parametrize("kind", ["SiglipModel", "Siglip2Model"])
def test_siglip_pairs_equal_transformers_on_both_backends(kind):
    # text narrower than its projection; non-default activations and eps in both towers
    src = build(kind, text=dict(hidden_act="gelu", layer_norm_eps=1e-5), vision=dict(hidden_act="quick_gelu"))
    clip, traced = px.load(src), px.load(src, backend="nnsight")
    images, tokens = images_for(), tokens_for()
    with torch.no_grad():
        out = src(input_ids=tokens, **image_args(src, images), output_hidden_states=True)
        image_ref = src.get_image_features(**image_args(src, images)).pooler_output
        text_ref = src.get_text_features(input_ids=tokens).pooler_output
        logits, tl_cache = clip.run_with_cache(images, tokens)
        _, cache = traced.run_with_cache(input_ids=tokens, pixel_values=images)
    assert abs(src.logit_bias.item()) > 0.01 and clip.logit_bias is not None
    torch.testing.assert_close(clip.encode_image(images), image_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(clip.encode_text(tokens), text_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, out.logits_per_image, atol=ATOL, rtol=0)
    assert_states_equal(tl_cache, out.vision_model_output.hidden_states, "visual.")
    assert_states_equal(tl_cache, out.text_model_output.hidden_states, "text.")
    cfg, tcfg = clip.visual.cfg, clip.text.cfg
    assert (cfg.global_pool, cfg.n_cls, cfg.d_proj, cfg.act_fn, tcfg.pool, tcfg.causal) == (
        "map", 0, 48, "quick_gelu", "last", False)
    assert type(traced).__name__ == "TracedSiglip" and clip.tokenizer is None  # no tokenizer files saved
    assert {"visual.hook_image_embed", "visual.blocks.1.attn.hook_pattern", "text.hook_text_embed"} <= set(cache)
    assert_sites_equal(traced, clip, cache, tl_cache)
    torch.testing.assert_close(cache["visual.hook_image_embed"], image_ref, atol=SITE_ATOL, rtol=0)


def test_siglip2_invokes_batch_as_images():
    """Two invokes of images run as one NaFlex batch; each reads its own rows."""
    src = build("Siglip2VisionModel", seed=3)
    traced, images = px.load(src, backend="nnsight"), images_for(batch=3)
    with torch.no_grad():
        _, whole = traced.run_with_cache(pixel_values=images)
        with traced.trace() as tracer:
            with tracer.invoke(pixel_values=images[:2]):
                first = traced.site("blocks.1.hook_resid_post").save()
            with tracer.invoke(pixel_values=images[2:]):
                second = traced.site("blocks.1.hook_resid_post").save()
    torch.testing.assert_close(torch.cat([first, second]), whole["blocks.1.hook_resid_post"], atol=SITE_ATOL, rtol=0)


def test_metaclip2_pools_at_the_first_eos_token():
    """No legacy argmax rule: eos_token_id 2 (CLIP's legacy case) pools at the first 2 as well (the
    ids after it are higher)."""
    eos = 2
    src = build("MetaClip2Model", text=dict(eos_token_id=eos), vision=dict(hidden_act="gelu"))
    clip, traced = px.load(src), px.load(src, backend="nnsight")
    images, tokens = images_for(), tokens_for(eos)
    with torch.no_grad():
        out = src(input_ids=tokens, pixel_values=images, output_hidden_states=True)
        logits, tl_cache = clip.run_with_cache(images, tokens)
        _, cache = traced.run_with_cache(input_ids=tokens, pixel_values=images)
        torch.testing.assert_close(clip.encode_text(tokens), src.get_text_features(input_ids=tokens).pooler_output,
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(clip.encode_image(images),
                                   src.get_image_features(pixel_values=images).pooler_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, out.logits_per_image, atol=ATOL, rtol=0)
    assert_states_equal(tl_cache, out.vision_model_output.hidden_states, "visual.")
    assert_states_equal(tl_cache, out.text_model_output.hidden_states, "text.")
    assert clip.text.cfg.pool == "eos" and clip.text.cfg.causal
    assert_sites_equal(traced, clip, cache, tl_cache)


# ---------------------------------------------------------------- image towers alone
@pytest.mark.parametrize("kind, output", [("SiglipVisionModel", "pooler_output"),
                                          ("Siglip2VisionModel", "pooler_output"),
                                          ("CLIPVisionModelWithProjection", "image_embeds"),
                                          ("MetaClip2VisionModelWithProjection", "image_embeds"),
                                          ("MetaClip2VisionModel", "pooler_output")])
def test_image_towers_alone_equal_transformers(kind, output):
    src = build(kind, seed=4, hidden_act="gelu_new", layer_norm_eps=1e-5)
    hooked, traced, images = px.load(src), px.load(src, backend="nnsight"), images_for()
    with torch.no_grad():
        ref = src(**image_args(src, images), output_hidden_states=True)
        got, tl_cache = hooked.run_with_cache(images)
        _, cache = traced.run_with_cache(pixel_values=images)
    torch.testing.assert_close(got, getattr(ref, output), atol=ATOL, rtol=0)
    assert_states_equal(tl_cache, ref.hidden_states)
    assert hooked.cfg.d_proj == (24 if output == "image_embeds" else 0) and traced.towers == {"visual": ""}
    assert ("hook_image_embed" in cache) == (output == "image_embeds") and "blocks.0.attn.hook_pattern" in cache
    assert_sites_equal(traced, hooked, cache, tl_cache)


@pytest.mark.parametrize("native", [False, True])
def test_aimv2_image_tower_equals_transformers(native):
    """RMSNorms, a patch norm, SwiGLU, biases on every projection, learned or sine-cosine positions,
    the attention-pool head."""
    src = build("Aimv2VisionModel", seed=5, qkv_bias=True, mlp_bias=True, is_native=native, rms_norm_eps=1e-6)
    hooked, traced, images = px.load(src), px.load(src, backend="nnsight"), images_for()
    with torch.no_grad():
        ref = src(pixel_values=images, output_hidden_states=True)
        got, tl_cache = hooked.run_with_cache(images)
        _, cache = traced.run_with_cache(images)
        folded = px.load(src, fold_ln=True, fold_value_biases=True)(images)
    assert ref.pooler_output.abs().max() > 0.05
    torch.testing.assert_close(got, ref.pooler_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(folded, ref.pooler_output, atol=ATOL, rtol=0)
    assert_states_equal(tl_cache, ref.hidden_states)
    cfg = hooked.cfg
    assert (cfg.norm_type, cfg.gated_mlp, cfg.patch_norm, cfg.global_pool, cfg.act_fn) == (
        "rmsnorm", True, True, "map", "silu")
    assert type(traced).__name__ == "TracedViT" and "blocks.1.mlp.hook_pre_linear" in cache
    assert_sites_equal(traced, hooked, cache, tl_cache)


@pytest.mark.parametrize("kind", ["SiglipForImageClassification", "Siglip2ForImageClassification"])
def test_siglip_classifiers_and_the_logit_lens_on_both_backends(kind):
    src = build(kind, seed=6, vision=dict(vision_use_head=False))  # the classifiers need no pooling head
    hooked, traced, images = px.load(src), px.load(src, backend="nnsight"), images_for()
    with torch.no_grad():
        ref = src(**image_args(src, images), output_hidden_states=True)
        logits, tl_cache = hooked.run_with_cache(images)
        _, cache = traced.run_with_cache(images)
    torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=0)
    assert_states_equal(tl_cache, ref.hidden_states)
    assert hooked.cfg.global_pool == "avg" and hooked.class_names == [f"class {i}" for i in range(5)]
    assert type(traced).__name__ == "TracedSiglipClassifier"
    assert_sites_equal(traced, hooked, cache, tl_cache)
    tl_lens, nn_lens = px.logit_lens(hooked, images), px.logit_lens(traced, images)
    assert tl_lens.values.shape == (2, 3, 16, 5)
    torch.testing.assert_close(nn_lens.values, tl_lens.values, atol=SITE_ATOL, rtol=0)


def test_weight_processing_keeps_the_siglip_logits():
    src = build("SiglipModel", seed=7)
    images, tokens = images_for(), tokens_for()
    clip = px.load(src, fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    with torch.no_grad():
        torch.testing.assert_close(clip(images, tokens), src(input_ids=tokens, pixel_values=images).logits_per_image,
                                   atol=ATOL, rtol=0)


# ---------------------------------------------------------------- saved folders
@pytest.mark.parametrize("kind", ["SiglipModel", "Siglip2VisionModel", "MetaClip2Model", "Aimv2VisionModel",
                                  "CLIPVisionModelWithProjection", "SiglipForImageClassification"])
def test_saved_folders_load_by_their_config(kind, tmp_path):
    src = build(kind, seed=8)
    src.save_pretrained(tmp_path)
    loaded = px.load(f"hf:{tmp_path}")
    images = images_for()
    adapter = adapter_for(src)
    with torch.no_grad():
        if hasattr(src, "text_model"):
            tokens = tokens_for(src.config.text_config.eos_token_id if kind == "MetaClip2Model" else None)
            torch.testing.assert_close(loaded.encode_image(images), adapter.reference_image_embed(src, images),
                                       atol=ATOL, rtol=0)
            torch.testing.assert_close(loaded.encode_text(tokens), adapter.reference_text_embed(src, tokens),
                                       atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(loaded(images), adapter.reference_output(src, images), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- refusals
REFUSED = [
    ("SiglipVisionModel", dict(vision_use_head=False), "vision_use_head=False"),
    ("SiglipModel", dict(vision=dict(vision_use_head=False)), "vision_use_head=False"),
    ("SiglipModel", dict(text=dict(projection_size=40)), "projection_size"),
    ("Siglip2VisionModel", dict(num_patches=12), "num_patches=12"),
    ("SiglipVisionModel", dict(hidden_act="gelu_fast"), "activation 'gelu_fast'"),
    ("Aimv2VisionModel", dict(use_head=False), "use_head=False"),
]


@pytest.mark.parametrize("kind, config, feature", REFUSED)
def test_unsupported_options_are_refused_by_name(kind, config, feature):
    src = build(kind, **config)
    for backend in ("tl", "nnsight"):
        with pytest.raises(UnsupportedModelError, match=feature):
            px.load(src, backend=backend)


def test_unsupported_classes_are_refused_by_name():
    from transformers import Aimv2Config

    tiny_text = {**TEXT, "projection_size": 48}
    refused = {
        transformers.Aimv2Model(Aimv2Config(text_config=TEXT, vision_config=VISION)): "Aimv2Model: its text tower",
        transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)): "CLIPTextModel: a text tower alone",
        transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)): "load the CLIPModel",
        transformers.SiglipTextModel(transformers.SiglipTextConfig(**tiny_text)): "load the SiglipModel",
        transformers.Siglip2TextModel(transformers.Siglip2TextConfig(**tiny_text)): "load the Siglip2Model",
    }
    for module, feature in refused.items():
        for backend in ("tl", "nnsight"):
            with pytest.raises(UnsupportedModelError, match=feature):
                px.load(module.eval(), backend=backend)
    meta = build("MetaClip2Model", text=dict(eos_token_id=[2, 7]))
    with pytest.raises(UnsupportedModelError, match="eos_token_id"):
        px.load(meta)


def test_the_image_tower_of_a_refused_aimv2_pair_converts():
    """Aimv2Model is refused for its text tower; its image tower loads on its own."""
    from transformers import Aimv2Config

    pair = randomized(transformers.Aimv2Model(Aimv2Config(text_config=TEXT, vision_config=VISION)), 9)
    vision, images = px.load(pair.vision_model), images_for()
    with torch.no_grad():
        torch.testing.assert_close(vision(images), pair.vision_model(pixel_values=images).pooler_output,
                                   atol=ATOL, rtol=0)
