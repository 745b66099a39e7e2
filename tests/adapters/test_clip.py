"""HookedCLIP reproduces open_clip and Hugging Face CLIP, tower by tower and block by block."""

import pytest
import torch
import torch.nn.functional as F

import prisma_ext as px
from prisma_ext.errors import InputError, PrismaError, UnknownNameError
from tests.support.clip_models import small_hf_clip, small_open_clip, text_tokens_for

ATOL = 1e-4
OPEN_CLIP_NAMES = ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14"]


def outputs_of(blocks, run):
    outs = []
    handles = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach())) for b in blocks]
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in handles:
            h.remove()
    return result, outs


@pytest.mark.parametrize("name", OPEN_CLIP_NAMES)
def test_open_clip_towers_match(name):
    src = small_open_clip(name)
    clip = px.load(src)
    images = torch.randn(2, 3, 32, 32)
    tokens = text_tokens_for(clip.text.cfg)
    ref_img, ref_vis_blocks = outputs_of(src.visual.transformer.resblocks, lambda: src.encode_image(images))
    ref_txt, ref_txt_blocks = outputs_of(src.transformer.resblocks, lambda: src.encode_text(tokens))
    with torch.no_grad():
        ref_logits, _ = src.get_logits(images, tokens)
        img, vcache = clip.visual.run_with_cache(images, return_type="embeds")
        txt, tcache = clip.text.run_with_cache(tokens)
        logits = clip(images, tokens)
    assert ref_img.abs().max() > 0.05 and ref_txt.abs().max() > 0.05
    torch.testing.assert_close(img, ref_img, atol=ATOL, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    for i, ref in enumerate(ref_vis_blocks):
        torch.testing.assert_close(vcache[f"blocks.{i}.hook_resid_post"], ref, atol=ATOL, rtol=0)
    for i, ref in enumerate(ref_txt_blocks):
        torch.testing.assert_close(tcache[f"blocks.{i}.hook_resid_post"], ref, atol=ATOL, rtol=0)


def test_activation_is_read_from_the_source():
    assert px.load(small_open_clip("ViT-B-32-quickgelu")).visual.cfg.act_fn == "quick_gelu"
    assert px.load(small_open_clip("ViT-B-32")).text.cfg.act_fn == "gelu"
    assert px.load(small_hf_clip(act="quick_gelu")).text.cfg.act_fn == "quick_gelu"
    assert px.load(small_hf_clip(act="gelu")).visual.cfg.act_fn == "gelu"


@pytest.mark.parametrize("eos", [49407, 2])
def test_hf_clip_matches(eos):
    src = small_hf_clip(eos_token_id=eos)
    clip = px.load(src)
    images = torch.randn(2, 3, 32, 32)
    tokens = text_tokens_for(clip.text.cfg, length=20)
    with torch.no_grad():
        out = src(input_ids=tokens, pixel_values=images, output_hidden_states=True)
        img, vcache = clip.visual.run_with_cache(images, return_type="embeds")
        txt, tcache = clip.text.run_with_cache(tokens)
        logits = clip(images, tokens)
    # CLIPModel.forward returns normalised embeddings
    torch.testing.assert_close(F.normalize(img, dim=-1), out.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(F.normalize(txt, dim=-1), out.text_embeds, atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(img, src.get_image_features(pixel_values=images).pooler_output,
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(txt, src.get_text_features(input_ids=tokens).pooler_output,
                                   atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, out.logits_per_image, atol=ATOL, rtol=0)
    vis_states = out.vision_model_output.hidden_states  # embeddings after pre-norm, then each layer
    txt_states = out.text_model_output.hidden_states
    for i in range(clip.visual.cfg.n_layers):
        torch.testing.assert_close(vcache[f"blocks.{i}.hook_resid_post"], vis_states[i + 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(tcache[f"blocks.{i}.hook_resid_post"], txt_states[i + 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(vcache["blocks.0.hook_resid_pre"], vis_states[0], atol=ATOL, rtol=0)


def test_hf_vision_model_alone_and_local_folder(tmp_path):
    from transformers import CLIPVisionModel

    src = small_hf_clip(seed=3)
    vision = CLIPVisionModel(src.config.vision_config).eval()
    vision.load_state_dict(src.vision_model.state_dict())
    hooked = px.load(vision)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hooked(images), vision(pixel_values=images).pooler_output, atol=ATOL, rtol=0)
    src.save_pretrained(tmp_path / "clip")
    loaded = px.load(f"hf:{tmp_path / 'clip'}")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), src.get_image_features(pixel_values=images)
                                   .pooler_output, atol=ATOL, rtol=0)


def test_site_names_carry_the_tower():
    clip = px.load(small_open_clip("ViT-B-32"))
    images, tokens = torch.randn(2, 3, 32, 32), text_tokens_for(clip.text.cfg, batch=2)
    _, cache = clip.run_with_cache(images, tokens)
    assert cache["visual.blocks.1.hook_resid_post"].shape == (2, 17, 48)
    assert cache["text.blocks.0.attn.hook_pattern"].shape[-2:] == (77, 77)
    assert "visual.hook_embed" in clip.hook_dict and "text.ln_final.hook_normalized" in clip.hook_dict
    # causal text attention: nothing attends to the future
    pattern = cache["text.blocks.1.attn.hook_pattern"]
    assert torch.all(pattern.triu(1) == 0)
    with pytest.raises(UnknownNameError, match="visual.blocks.0.hook_resid_post"):
        clip.run_with_hooks(images, tokens, fwd_hooks=[("vision.blocks.0.hook_resid_post", lambda t, hook: t)])
    # the towers keep their own names for TL's cache methods
    _, vcache = clip.visual.run_with_cache(images)
    assert "blocks.1.hook_resid_post" in vcache.keys()


@pytest.mark.parametrize("source", ["open_clip", "hf"])
@pytest.mark.parametrize("fold_ln", [False, True])
def test_zero_shot_direct_logit_attribution_sums_to_the_logit(source, fold_ln):
    src = small_open_clip("ViT-B-16") if source == "open_clip" else small_hf_clip()
    clip = px.load(src, fold_ln=fold_ln, center_writing_weights=fold_ln)
    names = ["cat", "dog", "car"]
    embeds = clip.use_zero_shot_head(names, templates=["a photo of a {}.", "a {} in the wild"])
    assert embeds.shape == (3, 24) and clip.visual.W_U.shape == (clip.visual.cfg.d_model, 3)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits, cache = clip.visual.run_with_cache(images)
        torch.testing.assert_close(logits, clip.encode_image(images) @ embeds.T, atol=ATOL, rtol=0)
        # CLIP's own logits rank the classes the same way
        ref = clip(images, [f"a photo of a {n}." for n in names])
    target = logits.argmax(-1)
    stack = cache.decompose_resid(pos_slice=0)
    attrs = cache.logit_attrs(stack, tokens=target, pos_slice=0)
    _, ln_b = clip.visual._final_affine()
    bias = clip.visual.b_U[target] + (ln_b @ clip.visual.W_U[:, target] if ln_b is not None else 0)
    rows = torch.arange(4)
    torch.testing.assert_close(attrs.sum(0) + bias, logits[rows, target], atol=ATOL, rtol=0)
    torch.testing.assert_close(clip.visual.readout_bias(target), bias, atol=ATOL, rtol=0)
    assert ref.shape == (4, 3)
    assert clip.visual.to_single_token("dog") == 1


def test_prompts_tokenize_offline_and_long_ones_warn():
    clip = px.load(small_open_clip("ViT-B-32"))
    tokens = clip.tokenize(["a photo of a cat"])
    assert tokens.shape == (1, 77) and tokens[0, 0] == 49406
    with pytest.warns(UserWarning, match="truncated"):
        long = clip.tokenize(["cat " * 200, "dog"])
    assert long[0, -1] == 49407  # the end-of-text token survives truncation
    with torch.no_grad():
        assert clip.encode_text(long).shape == (2, 24)


def test_bad_clip_inputs():
    clip = px.load(small_open_clip("ViT-B-32"))
    with pytest.raises(InputError, match="no prompts"):
        clip.tokenize([])
    with pytest.raises(InputError, match="no class names"):
        clip.zero_shot_classifier([])
    with pytest.raises(InputError, match="batch mismatch: 2 images, 3 prompts"):
        clip.image_text_score(torch.randn(2, 3, 32, 32), ["a", "b", "c"])
    with pytest.raises(InputError, match="token ids must lie"):
        clip.encode_text(torch.full((1, 77), 60000))
    with pytest.raises(InputError, match="exceed the context length 77"):
        clip.encode_text(torch.ones(1, 80, dtype=torch.long))
    with torch.no_grad():
        assert clip.image_text_score(torch.randn(2, 3, 32, 32), ["a cat", "a dog"]).shape == (2,)


def test_named_open_clip_sources():
    with pytest.raises(UnknownNameError, match="ViT-B-32"):
        px.load("open_clip:ViT-B-33", pretrained=False)
    with pytest.raises(UnknownNameError, match="openai"):
        px.load("open_clip:ViT-B-32/opena", pretrained=True)
    clip = px.load("open_clip:ViT-S-32", pretrained=False)
    assert clip.visual.cfg.n_layers == 12 and clip.source == "open_clip:ViT-S-32"
    assert clip.tokenize(["hello"]).shape == (1, 77)


def test_coca_is_refused_with_the_feature_named():
    with pytest.raises(PrismaError, match="CoCa"):
        px.load(small_open_clip("coca_ViT-B-32"))
