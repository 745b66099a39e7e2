"""The nnsight backend on CLIP: the original open_clip / Hugging Face model traced by nnsight.

Sites equal HookedCLIP's, edits equal TL edits, gradients equal autograd, invokes batch,
attention swaps are undone (also when a trace raises), and Hugging Face CLIP round-trips
through nnsight's remote machinery with prisma_ext hidden (its local simulation, and nnsight's own
model class rebuilt from the key).
"""

import json

import numpy as np
import pytest
import torch
from nnsight import save

import prisma_ext as px
from prisma_ext.errors import InputError, PrismaError, UnknownNameError
from tests.support.clip_models import small_hf_clip, small_open_clip, swapped_attention, text_tokens_for
from tests.support.hidden import HiddenServer, local_simulation_hides_prisma_ext, prisma_ext_hidden
from tests.support.models import module_hooks
from tests.support.patcher import reference_patch

ATOL = 1e-5
SOURCES = ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-L-14-CLIPA", "hf"]


def build(source, seed=0):
    """(source module, HookedCLIP, TracedCLIP, images, tokens, forward kwargs)."""
    src = small_hf_clip(seed=seed) if source == "hf" else small_open_clip(source, seed=seed)
    hooked, traced = px.load(src), px.load(src, backend="nnsight")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    tokens = text_tokens_for(hooked.text.cfg, batch=2, length=20 if source == "hf" else None)
    inputs = (dict(input_ids=tokens, pixel_values=images) if source == "hf"
              else dict(image=images, text=tokens))
    return src, hooked, traced, images, tokens, inputs


def logits_of(output):
    """logits_per_image [n_images, n_texts] from either source's forward output."""
    if hasattr(output, "logits_per_image"):
        return output.logits_per_image
    image, text, scale = output[:3]
    logits = scale * image @ text.T
    return logits + output[3] if len(output) > 3 else logits


def attention_as_built(model):
    """Every HF attention module reads its tower's own config, which names SDPA."""
    towers = [model.vision_model, model.text_model]
    return all(layer.self_attn.config is tower.config and tower.config._attn_implementation == "sdpa"
               for tower in towers for layer in tower.encoder.layers)


# ---------------------------------------------------------------- reading sites
@pytest.mark.parametrize("source", SOURCES)
def test_every_site_equals_the_tl_backend(source):
    src, hooked, traced, images, tokens, inputs = build(source)
    with torch.no_grad():
        ref = logits_of(src(**inputs))
        tl_logits, tl_cache = hooked.run_with_cache(images, tokens)
        out, cache = traced.run_with_cache(**inputs)
    assert type(traced).__name__ == "TracedCLIP" and traced.towers == {"visual": "visual.", "text": "text."}
    assert list(cache) == traced.site_names and len(cache) >= 2 * 13 * 2 + 6
    for name, value in cache.items():
        torch.testing.assert_close(value, tl_cache[name], atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(logits_of(out), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_of(out), tl_logits, atol=1e-4, rtol=0)
    assert traced.layout == hooked.layout and traced.text_cfg.causal == hooked.text.cfg.causal


def test_hf_vision_model_takes_hooked_vit_names():
    from transformers import CLIPVisionModel

    src = small_hf_clip(seed=3)
    vision = CLIPVisionModel(src.config.vision_config).eval()
    vision.load_state_dict(src.vision_model.state_dict())
    hooked, traced = px.load(vision), px.load(vision, backend="nnsight")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, tl_cache = hooked.run_with_cache(images)
        out, cache = traced.run_with_cache(pixel_values=images)
    assert traced.towers == {"visual": ""} and traced.text_cfg is None
    assert "blocks.1.attn.hook_pattern" in cache and "hook_image_embed" not in cache
    for name, value in cache.items():
        torch.testing.assert_close(value, tl_cache[name], atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(out.pooler_output, cache["hook_pooled"], atol=0, rtol=0)
    assert traced.site_shapes(batch_size=3) == {k: v for k, v in hooked.site_shapes(3).items() if k in cache}


def test_site_shapes_towers_and_image_only_runs():
    src, hooked, traced, images, tokens, _ = build("ViT-B-32")
    shapes, tl_shapes = traced.site_shapes(batch_size=2), hooked.site_shapes(batch_size=2)
    assert list(shapes) == traced.site_names
    assert all(shapes[name] == tl_shapes[name] for name in shapes)
    assert shapes["visual.blocks.0.attn.hook_pattern"] == (2, 3, 17, 17)
    assert shapes["text.blocks.1.attn.hook_z"] == (2, 77, 2, 16)
    with torch.no_grad():  # open_clip runs only the towers it gets inputs for
        out, cache = traced.run_with_cache(images)
        torch.testing.assert_close(out[0], src.encode_image(images, normalize=True), atol=ATOL, rtol=0)
    assert cache and all(name.startswith("visual.") for name in cache)
    with pytest.raises(PrismaError, match="text tower"):
        traced.run_with_cache(images, names_filter="text.blocks.0.hook_resid_pre")


# ---------------------------------------------------------------- edits are real
EDITS = ["visual.hook_patch_embed", "visual.hook_embed", "visual.blocks.0.attn.hook_q",
         "visual.blocks.1.attn.hook_v", "visual.blocks.0.attn.hook_pattern", "visual.blocks.1.attn.hook_z",
         "visual.blocks.0.hook_attn_out", "visual.blocks.1.hook_resid_mid", "visual.blocks.0.mlp.hook_post",
         "visual.ln_final.hook_normalized", "text.hook_embed", "text.blocks.0.attn.hook_k",
         "text.blocks.1.attn.hook_pattern", "text.blocks.0.hook_mlp_out", "text.blocks.1.hook_resid_post",
         "text.ln_final.hook_normalized"]


def edit(name, t):
    if name.endswith("hook_pattern"):  # uniform attention over what the mask allows
        return (t > 0).float() / (t > 0).float().sum(-1, keepdim=True)
    return t * torch.linspace(0.5, 2.0, t.shape[-1]) - 0.1


@pytest.mark.parametrize("source", ["ViT-B-32", "hf"])
def test_editing_a_site_equals_the_same_tl_edit(source):
    src, hooked, traced, images, tokens, inputs = build(source, seed=3)
    with torch.no_grad():
        clean = hooked(images, tokens)
        for i, name in enumerate(EDITS):
            hook = (name, lambda t, hook, name=name: edit(name, t))
            tl_edited = hooked.run_with_hooks(images, tokens, fwd_hooks=[hook])
            with traced.trace(**inputs):
                if i % 2:
                    traced.set_site(name, edit(name, traced.site(name)))
                else:  # in place
                    value = traced.site(name)
                    value[...] = edit(name, value)
                edited = traced.output.save()
            assert (tl_edited - clean).abs().max() > 1e-3, f"the edit of {name} must matter"
            torch.testing.assert_close(logits_of(edited), tl_edited, atol=1e-4, rtol=0, msg=name)


# ---------------------------------------------------------------- nothing left behind
@pytest.mark.parametrize("source", ["ViT-B-32", "hf"])
def test_attention_swaps_are_undone_and_outputs_unchanged(source):
    src, _, traced, images, tokens, inputs = build(source, seed=5)
    before_swaps, hooks_before = swapped_attention(src), module_hooks(src)
    with torch.no_grad():
        before = logits_of(src(**inputs))
        with traced.trace(**inputs):
            for tower in ("visual", "text"):
                for i in range(2):
                    traced.site(f"{tower}.blocks.{i}.attn.hook_q").save()
                    traced.site(f"{tower}.blocks.{i}.attn.hook_pattern").save()
            during = traced.output.save()
    assert swapped_attention(src) == before_swaps
    torch.testing.assert_close(logits_of(during), before, atol=ATOL, rtol=0)
    with pytest.raises(RuntimeError, match="boom"):
        with traced.trace(**inputs):
            traced.site("visual.blocks.1.attn.hook_pattern")
            raise RuntimeError("boom")
    assert swapped_attention(src) == before_swaps
    with pytest.raises(InputError):  # an error raised by the site machinery itself
        with traced.trace(**inputs):
            traced.site("text.blocks.0.attn.hook_q")
            traced.set_site("text.blocks.0.attn.hook_pattern", torch.zeros(3))
    assert swapped_attention(src) == before_swaps
    assert module_hooks(src) == hooks_before == {}
    with torch.no_grad():
        assert torch.equal(logits_of(src(**inputs)), before)
        assert torch.equal(logits_of(traced(**inputs)), before)  # outside a trace: the module's forward


# ---------------------------------------------------------------- several invokes
def test_clean_corrupted_patching_equals_torch_hooks():
    src, _, traced, images, tokens, _ = build("ViT-B-32-quickgelu", seed=7)
    corrupt = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    block, positions = src.visual.transformer.resblocks[1], [0, 3, 7]
    with torch.no_grad():
        with traced.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(images, tokens):
                source = traced.site("visual.blocks.1.hook_resid_pre")
                barrier()
                clean_out = traced.output.save()
            with tracer.invoke(corrupt, tokens):
                barrier()
                target = traced.site("visual.blocks.1.hook_resid_pre")
                target[:, positions] = source[:, positions]
                patched = traced.output.save()
        ref_clean, ref_patched = reference_patch(block, lambda: logits_of(src(images, tokens)),
                                                 lambda: logits_of(src(corrupt, tokens)), positions, port="input")
        corrupt_out = logits_of(src(corrupt, tokens))
    assert (ref_patched - corrupt_out).abs().max() > 1e-3
    torch.testing.assert_close(logits_of(clean_out), ref_clean, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_of(patched), ref_patched, atol=ATOL, rtol=0)
    assert not module_hooks(src)


def test_mismatched_invokes_are_refused():
    _, _, traced, images, tokens, _ = build("ViT-B-32")
    with pytest.raises(InputError, match="pairs"):
        with traced.trace() as tracer:
            with tracer.invoke(images, tokens[:1]):
                traced.output.save()
            with tracer.invoke(images, tokens):
                traced.output.save()
    with pytest.raises(InputError, match="same inputs"):
        with traced.trace() as tracer:
            with tracer.invoke(images, tokens):
                traced.output.save()
            with tracer.invoke(images):
                traced.output.save()
    with pytest.raises(InputError, match="32x32"):
        with traced.trace(torch.randn(1, 3, 40, 40), tokens[:1]):
            traced.output.save()
    with pytest.raises(InputError, match="token ids must lie"):
        with traced.trace(images, torch.full((2, 77), 60000)):
            traced.output.save()


# ---------------------------------------------------------------- gradients
GRAD_SITES = ["visual.hook_embed", "visual.blocks.0.attn.hook_q", "visual.blocks.0.attn.hook_pattern",
              "visual.blocks.1.attn.hook_z", "visual.blocks.1.hook_resid_mid", "text.hook_embed",
              "text.blocks.0.attn.hook_v", "text.blocks.1.attn.hook_pattern", "text.ln_final.hook_normalized"]


@pytest.mark.parametrize("source", ["ViT-B-16", "hf"])
def test_gradients_at_sites_equal_tl_autograd(source):
    src, hooked, traced, images, tokens, inputs = build(source, seed=11)
    kept = {}

    def keep(t, hook):
        t.retain_grad()
        kept[hook.name] = t

    hooked.run_with_hooks(images, tokens, fwd_hooks=[(n, keep) for n in GRAD_SITES])[0, 1].backward()
    with traced.trace(**inputs):
        acts = [traced.site(name) for name in GRAD_SITES]
        loss = logits_of(traced.output)[0, 1]
        with loss.backward():
            grads = save([act.grad for act in reversed(acts)])
    got = dict(zip(reversed(GRAD_SITES), grads))
    for name in GRAD_SITES:
        torch.testing.assert_close(got[name], kept[name].grad, atol=1e-5, rtol=1e-3, msg=name)
    assert not module_hooks(src)


# ---------------------------------------------------------------- remote (nnsight's round trip)
@pytest.fixture(scope="module")
def saved_hf_clip(tmp_path_factory):
    src = small_hf_clip(seed=4)
    folder = tmp_path_factory.mktemp("clip")
    src.save_pretrained(folder)
    return src, str(folder)


REMOTE_SITES = ["visual.blocks.0.attn.hook_pattern", "visual.blocks.1.hook_resid_post",
                "text.blocks.0.attn.hook_z", "text.hook_text_embed"]


def traced_values(model, inputs, **trace_kwargs):
    """Read REMOTE_SITES and make block 1's image attention uniform (an edit, also remotely)."""
    uniform = torch.full((2, 3, 17, 17), 1 / 17)
    with torch.no_grad():
        with model.trace(**inputs, **trace_kwargs):
            values = save([model.site(REMOTE_SITES[0])])
            model.set_site("visual.blocks.1.attn.hook_pattern", uniform)
            for name in REMOTE_SITES[1:]:
                values.append(model.site(name))
            logits = model.output.logits_per_image.save()
    return values, logits


def test_remote_local_simulation_equals_a_local_trace(saved_hf_clip):
    from nnsight.modeling.huggingface import HuggingFaceModel
    from nnsight.modeling.mixins.remotable import Remotable

    src, folder = saved_hf_clip
    remote = px.load(f"hf:{folder}", backend="nnsight", remote="local")
    assert isinstance(remote, Remotable) and type(remote).__name__ == "RemoteTracedCLIP"
    assert remote._remoteable_class() is HuggingFaceModel  # the key names nnsight's class
    assert not remote.dispatched  # built on the meta device: no weights until a run needs them
    local = px.load(src, backend="nnsight")
    tokens = text_tokens_for(local.text_cfg, batch=2, length=20)
    inputs = dict(input_ids=tokens, pixel_values=torch.randn(2, 3, 32, 32))
    expected, expected_logits = traced_values(local, inputs)
    with local_simulation_hides_prisma_ext() as hides:  # serialised, rebuilt without prisma_ext, run
        got, logits = traced_values(remote, inputs)
    assert hides and hides[0].checked and not hides[0].attempts
    for name, a, b in zip(REMOTE_SITES, got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(logits, expected_logits, atol=0, rtol=0)
    assert remote.site_names == local.site_names and remote.cfg.device.type == "cpu"
    assert not module_hooks(remote._module) and attention_as_built(remote._module)
    pixels = remote.preprocess(np.zeros((40, 30, 3), np.uint8))  # real values to send, not meta tensors
    assert pixels.device.type == "cpu" and pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixels, local.preprocess(np.zeros((40, 30, 3), np.uint8)))


def test_a_server_rebuilds_the_model_from_its_key_and_runs_the_request(saved_hf_clip):
    """What an NDIF worker does, without prisma-ext: build nnsight's class named by the key from the
    repo id, deserialise the request against that model's modules, run it there
    (`tests.support.hidden.HiddenServer`: prisma_ext hidden throughout)."""
    from nnsight.modeling.huggingface import HuggingFaceModel
    from nnsight.modeling.mixins.remotable import Remotable

    from prisma_ext.traced.remote import model_key

    src, folder = saved_hf_clip
    client = px.load(f"hf:{folder}", backend="nnsight", remote=True)
    key = model_key(client, allow_folder=True)  # to_model_key() refuses a folder; a server gets a repo id
    assert key == f"nnsight.modeling.huggingface.HuggingFaceModel:{json.dumps({'repo_id': folder, 'revision': None})}"
    with prisma_ext_hidden():
        server = Remotable.from_model_key(key, dispatch=True)
    assert type(server) is HuggingFaceModel
    before = swapped_attention(server._module)
    worker = HiddenServer(server, ("values", "logits"))
    tokens = text_tokens_for(client.text_cfg, batch=2, length=20)
    inputs = dict(input_ids=tokens, pixel_values=torch.randn(2, 3, 32, 32))
    got, logits = traced_values(client, inputs, backend=worker)
    expected, expected_logits = traced_values(px.load(src, backend="nnsight"), inputs)
    for name, a, b in zip(REMOTE_SITES, got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(logits, expected_logits, atol=0, rtol=0)
    assert not client.dispatched  # the client never loaded weights
    assert worker.envoy_class.__name__ == "RemoteSitesHF" and worker.blocker.checked
    assert swapped_attention(server._module) == before and not module_hooks(server._module)


def test_what_cannot_run_remotely_is_refused(saved_hf_clip):
    src, folder = saved_hf_clip
    remote = px.load(f"hf:{folder}", backend="nnsight", remote=True)
    with pytest.raises(PrismaError, match="local folder"):  # before any network access
        remote.to_model_key()
    with pytest.raises(PrismaError, match="repo id"):
        px.load(src, backend="nnsight", remote=True)
    with pytest.raises(PrismaError, match="repo id"):
        px.load("open_clip:ViT-B-32", backend="nnsight", remote=True)
    with pytest.raises(PrismaError, match="backend='nnsight'"):
        px.load(f"hf:{folder}", remote=True)
    with pytest.raises(PrismaError, match="published weights"):
        px.load(f"hf:{folder}", backend="nnsight", remote=True, pretrained=False)


# ---------------------------------------------------------------- errors
def test_unknown_and_unmapped_sites_name_the_closest():
    _, _, traced, images, tokens, _ = build("ViT-B-32")
    with pytest.raises(UnknownNameError, match="visual.blocks.0.hook_resid_post"):
        traced.select_sites(["vision.blocks.0.hook_resid_post"])
    with pytest.raises(UnknownNameError, match="not mapped"):
        with traced.trace(images, tokens):
            traced.site("text.hook_pos_embed")
    with pytest.raises(UnknownNameError, match="inline"):
        traced.select_sites("visual.hook_pooled")  # open_clip slices the class token inline
    with pytest.raises(PrismaError, match="fold_ln"):
        px.load(small_open_clip("ViT-B-32"), backend="nnsight", fold_ln=True)
