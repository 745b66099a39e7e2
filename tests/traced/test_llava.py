"""The nnsight backend on Hugging Face LLaVA: a tiny random `LlavaForConditionalGeneration` (CLIP
or SigLIP vision tower, Llama language model) saved with `save_pretrained` and loaded by `hf:`.

Every site equals a plain torch hook on the Hugging Face module it names (module paths written
here, not taken from the site map) and the tower's / language model's own `hidden_states`; the
projector's input is the hidden state `vision_feature_layer` selects and its output equals
`get_image_features`; edits change the next-token logits exactly as the same edit made with a
torch hook; activation patching on the tower, scored by a logit difference at the last position,
equals a patch written with torch hooks; the user's module is left as it was after every call.
"""

import pytest
import torch

import prisma_ext as px
from prisma_ext.errors import IdentityError, InputError, PrismaError, UnknownNameError, UnsupportedModelError
from tests.support.models import module_hooks, randomize_

ATOL = 1e-5
IMAGE_TOKEN, VOCAB = 39, 40
PROMPT = [1, IMAGE_TOKEN, 5, 6]  # the image token once: it becomes the image's tokens
ANSWER_A, ANSWER_B = 3, 7
TOWERS = {  # tower, vision_feature_layer, strategy
    "clip": ("clip", -2, "default"),
    "siglip": ("siglip", [0, -1], "full"),
    "siglip_headless": ("siglip_headless", -1, "full"),
}


def small_llava(tower: str, layer, strategy: str, seed: int = 0):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
                  patch_size=4)
    if tower == "clip":
        vision_config = CLIPVisionConfig(**vision)
    else:
        vision_config = SiglipVisionConfig(**vision, vision_use_head=tower == "siglip")
    text = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    config = LlavaConfig(vision_config=vision_config, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    return randomize_(LlavaForConditionalGeneration(config).eval(), seed)


@pytest.fixture(scope="module", params=list(TOWERS))
def llava(request, tmp_path_factory):
    """A TracedLlava loaded from a saved folder by `hf:`."""
    folder = tmp_path_factory.mktemp(f"llava-{request.param}")
    small_llava(*TOWERS[request.param]).save_pretrained(folder)
    model = px.load(f"hf:{folder}", backend="nnsight")
    model.folder = folder
    return model


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ references
def _split(heads):
    return lambda t: t.unflatten(-1, (heads, -1))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def torch_reads(module):
    """Site name -> (submodule, "in"/"out", to TL layout): every site, written by hand."""
    tower, lm = module.model.vision_tower, module.model.language_model
    ident, tokens = (lambda t: t), (lambda t: t.flatten(2).transpose(1, 2))
    reads = {"visual.hook_patch_embed": (tower.embeddings.patch_embedding, "out", tokens)}
    if type(tower).__name__ == "CLIPVisionModel":
        reads["visual.hook_full_embed"] = (tower.pre_layrnorm, "in", ident)
        reads["visual.ln_pre.hook_normalized"] = reads["visual.hook_embed"] = (tower.pre_layrnorm, "out", ident)
    for i, layer in enumerate(tower.encoder.layers):
        b, a, split = f"visual.blocks.{i}.", layer.self_attn, _split(layer.self_attn.num_heads)
        reads.update({
            b + "hook_resid_pre": (layer, "in", ident), b + "ln1.hook_normalized": (layer.layer_norm1, "out", ident),
            b + "attn.hook_q": (a.q_proj, "out", split), b + "attn.hook_k": (a.k_proj, "out", split),
            b + "attn.hook_v": (a.v_proj, "out", split), b + "attn.hook_z": (a.out_proj, "in", split),
            b + "hook_attn_out": (a, "out", _first), b + "hook_resid_mid": (layer.layer_norm2, "in", ident),
            b + "ln2.hook_normalized": (layer.layer_norm2, "out", ident),
            b + "mlp.hook_pre": (layer.mlp.fc1, "out", ident),
            b + "mlp.hook_post": (layer.mlp.activation_fn, "out", ident), b + "hook_mlp_out": (layer.mlp, "out", ident),
            b + "hook_resid_post": (layer, "out", _first)})
    if type(tower).__name__ == "CLIPVisionModel":
        reads["visual.ln_final.hook_normalized"] = (tower.post_layernorm, "out", lambda t: t[:, None])
        reads["visual.hook_pooled"] = (tower.post_layernorm, "out", ident)
    else:
        reads["visual.ln_final.hook_normalized"] = (tower.post_layernorm, "out", ident)
        if getattr(tower, "head", None) is not None:
            reads["visual.hook_pooled"] = (tower.head, "out", ident)
    reads["visual.hook_image_features"] = (module.model.multi_modal_projector, "in", ident)
    reads["visual.hook_projected"] = (module.model.multi_modal_projector, "out", ident)
    for i, layer in enumerate(lm.layers):
        b = f"lm.blocks.{i}."
        reads.update({
            b + "hook_resid_pre": (layer, "in", ident),
            b + "ln1.hook_normalized": (layer.input_layernorm, "out", ident),
            b + "hook_attn_out": (layer.self_attn, "out", _first),
            b + "hook_resid_mid": (layer.post_attention_layernorm, "in", ident),
            b + "ln2.hook_normalized": (layer.post_attention_layernorm, "out", ident),
            b + "hook_mlp_out": (layer.mlp, "out", ident), b + "hook_resid_post": (layer, "out", _first)})
    reads["lm.ln_final.hook_normalized"] = (lm.norm, "out", ident)
    return reads


def read_with_torch_hooks(module, inputs):
    """(every site by plain torch hooks, the logits); the hooks are removed after."""
    values, handles = {}, []
    for name, (mod, port, view) in torch_reads(module).items():
        def keep(value, name=name, view=view):
            values[name] = view(value).detach().clone()
        if port == "in":
            handles.append(mod.register_forward_pre_hook(lambda m, args, keep=keep: keep(args[0])))
        else:
            handles.append(mod.register_forward_hook(lambda m, args, out, keep=keep: keep(out)))
    try:
        with torch.no_grad():
            logits = module(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    for key in [k for k in values if k.endswith("attn.hook_q")]:  # the pattern, from q and k
        q, k = values[key], values[key.replace("hook_q", "hook_k")]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        values[key.replace("hook_q", "hook_pattern")] = scores.softmax(-1)
    return values, logits


def set_output_hook(layer, fn, prepend=True):
    """A forward hook replacing `layer`'s (first) output with fn(output). `prepend`: before
    transformers' own hidden-state capture hooks (else the projector keeps the unedited output)."""
    def hook(mod, args, out):
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
    return layer.register_forward_hook(hook, prepend=prepend)


def logit_diff(logits):
    return logits[:, -1, ANSWER_A] - logits[:, -1, ANSWER_B]


def gap(a, b):
    return float((a - b).abs().max())


# ------------------------------------------------------------------ loading and sites
def test_every_site_equals_a_torch_hook(llava):
    inputs = llava.inputs(images(), PROMPT)
    with torch.no_grad():
        output, traced = llava.run_with_cache(**inputs)
    want, logits = read_with_torch_hooks(llava._module, inputs)
    assert set(traced) == set(want) == set(llava.site_names)
    for name in llava.site_names:
        assert gap(traced[name], want[name]) < ATOL, name
    assert gap(output.logits, logits) < ATOL


def test_residual_stream_is_the_hidden_states(llava):
    """blocks.{i}.hook_resid_post is hidden_states[i + 1] (resid_pre of block 0: [0]), in the
    tower and in the language model (whose last hidden state is after its final norm)."""
    inputs = llava.inputs(images(), PROMPT)
    module = llava._module
    with torch.no_grad():
        _, traced = llava.run_with_cache(**inputs)
        tower_hidden = module.model.vision_tower(pixel_values=inputs["pixel_values"],
                                                 output_hidden_states=True).hidden_states
        lm_hidden = module(**inputs, output_hidden_states=True).hidden_states
    assert gap(traced["visual.blocks.0.hook_resid_pre"], tower_hidden[0]) < ATOL
    for i in range(3):
        assert gap(traced[f"visual.blocks.{i}.hook_resid_post"], tower_hidden[i + 1]) < ATOL
        assert gap(traced[f"visual.blocks.{i}.hook_resid_post"], tower_hidden[i]) > 1e-2  # not the block before
    assert gap(traced["lm.blocks.0.hook_resid_pre"], lm_hidden[0]) < ATOL
    assert gap(traced["lm.blocks.0.hook_resid_post"], lm_hidden[1]) < ATOL
    assert gap(traced["lm.ln_final.hook_normalized"], lm_hidden[2]) < ATOL


READS = {"clip": (("visual.blocks.1.hook_resid_post",), 1),  # -2 of 3 layers: hidden_states[2], CLS dropped
         "siglip": (("visual.blocks.0.hook_resid_pre", "visual.blocks.2.hook_resid_post"), 0),  # [0, -1]
         "siglip_headless": (("visual.blocks.2.hook_resid_post",), 0)}  # -1: before post_layernorm


def test_projector_reads_the_selected_hidden_states(llava, request):
    kind = request.node.callspec.params["llava"]
    reads = llava.projector_reads
    assert (reads.sites, reads.first_token) == READS[kind]  # checked by hand against get_image_features
    inputs = llava.inputs(images(), PROMPT)
    module = llava._module
    with torch.no_grad():
        _, traced = llava.run_with_cache(**inputs)
        features = module.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        projected = module.model.multi_modal_projector(traced["visual.hook_image_features"])
    selected = torch.cat([traced[s][:, reads.first_token:] for s in reads.sites], -1)
    assert gap(traced["visual.hook_image_features"], selected) < ATOL
    assert gap(traced["visual.hook_projected"], torch.stack(list(features))) < ATOL
    assert gap(traced["visual.hook_projected"], projected) < ATOL
    assert traced["visual.hook_projected"].shape == (2, llava.n_image_tokens, 32)
    last = "visual.blocks.2.hook_resid_post"
    if last not in reads.sites:  # the default -2 is not the last block
        assert gap(traced["visual.hook_image_features"], traced[last][:, reads.first_token:]) > 1e-2


def test_a_tied_last_hidden_state_is_the_final_norm():
    """A SigLIP tower whose config ties its last hidden state to `last_hidden_state` (after
    `post_layernorm`): the projector then reads `ln_final.hook_normalized`, not the last block."""
    module = small_llava(*TOWERS["siglip_headless"])
    module.model.vision_tower.config.tie_last_hidden_states = True
    model = px.load(module, backend="nnsight")  # its check compares with the tied hidden states
    assert model.projector_reads.sites == ("visual.ln_final.hook_normalized",)
    with torch.no_grad():
        _, traced = model.run_with_cache(**model.inputs(images(), PROMPT))
    assert gap(traced["visual.hook_image_features"], traced["visual.ln_final.hook_normalized"]) < ATOL


def test_module_instance_and_tl_refusal(llava):
    from transformers import LlavaForConditionalGeneration

    module = LlavaForConditionalGeneration.from_pretrained(llava.folder).eval()
    again = px.load(module, backend="nnsight")
    assert again.site_names == llava.site_names
    with pytest.raises(UnsupportedModelError, match="nnsight backend only"):
        px.load(module)
    with pytest.raises(UnsupportedModelError, match=r"\(hf:.*nnsight backend only"):  # from the config alone
        px.load(f"hf:{llava.folder}")


# ------------------------------------------------------------------ edits
def test_edits_change_the_logits_as_torch_hooks_do(llava):
    """Zeroing one image token's residual (at block 0, and at the hidden state the projector
    reads, by either of its names) or one projected image token changes the next-token logits
    exactly as the same edit made with a plain torch forward hook."""
    inputs = llava.inputs(images(), PROMPT)
    module = llava._module
    tower = module.model.vision_tower
    k = llava.projector_reads.layers[-1]  # hidden_states[k]: block k-1's output
    with torch.no_grad():
        clean = module(**inputs).logits

    def zero(t, token=3):
        t = t.clone()
        t[:, token] = 0
        return t

    edits = [("visual.blocks.0.hook_resid_post", tower.encoder.layers[0]),
             ("visual.hook_projected", module.model.multi_modal_projector)]
    if k > 0:
        edits.append((f"visual.blocks.{k - 1}.hook_resid_post", tower.encoder.layers[k - 1]))
        if k < 3:
            edits.append((f"visual.blocks.{k}.hook_resid_pre", tower.encoder.layers[k - 1]))
    for name, layer in edits:
        with torch.no_grad():
            with llava.trace(**inputs):
                llava.set_site(name, zero(llava.site(name)))
                got = llava.output.logits.save()
            handle = set_output_hook(layer, zero)
            try:
                want = module(**inputs).logits
            finally:
                handle.remove()
        assert gap(got, want) < ATOL, name
        assert gap(got, clean) > 1e-4, name  # the edit is real


# ------------------------------------------------------------------ patching
def test_activation_patching_equals_a_torch_hook_patch(llava):
    """px.activation_patching on `px.llava_backend(llava, prompt)`: each (layer, token) of the tower's
    residual stream from the clean run into the corrupted one, scored by the logit difference of
    two answer tokens at the last position, equals the same patch made with torch hooks."""
    clean, corrupted = images(2, seed=1), images(2, seed=2)
    target, be = px.LogitDiff(ANSWER_A, ANSWER_B), px.llava_backend(llava, PROMPT)
    first = min(llava.projector_reads.layers)  # the projector also reads hidden_states[first]
    if len(llava.projector_reads.layers) > 1:  # patching a deeper block alone cannot restore it: refused
        with pytest.raises(IdentityError, match="depends on more than its residual stream"):
            px.activation_patching(be, clean, corrupted, target=target, layers=[first + 1], progress=False)
    layers, positions = [layer for layer in (0, 1) if len(llava.projector_reads.layers) == 1 or layer <= first], [0, 5]
    sweep = px.activation_patching(be, clean, corrupted, target=target, sites=("resid_post",), layers=layers,
                                   positions=positions, progress=False)
    values = sweep["resid_post"].values  # [batch, layer, position]
    module = llava._module
    blocks = module.model.vision_tower.encoder.layers
    clean_in, corrupted_in = llava.inputs(clean, PROMPT), llava.inputs(corrupted, PROMPT)
    with torch.no_grad():
        _, cache = llava.run_with_cache(**clean_in, names_filter=[f"visual.blocks.{i}.hook_resid_post" for i in layers])
        m_clean, m_corr = logit_diff(module(**clean_in).logits), logit_diff(module(**corrupted_in).logits)
        for li, layer in enumerate(layers):
            source = cache[f"visual.blocks.{layer}.hook_resid_post"]
            for pi, pos in enumerate(positions):
                def patch(t, pos=pos, source=source):
                    t = t.clone()
                    t[:, pos] = source[:, pos]
                    return t
                handle = set_output_hook(blocks[layer], patch)
                try:
                    want = logit_diff(module(**corrupted_in).logits)
                finally:
                    handle.remove()
                assert gap(values[:, li, pi], want) < ATOL, (layer, pos)
    assert gap(sweep["resid_post"].meta["clean_metric"], m_clean) < ATOL
    assert gap(sweep["resid_post"].meta["corrupted_metric"], m_corr) < ATOL
    assert gap(values, m_corr[:, None, None]) > 1e-4  # some patch moves the metric


def test_readout_methods_are_refused_by_name(llava):
    be = px.llava_backend(llava, PROMPT)
    for method in (px.logit_lens, lambda b, x: px.direct_logit_attribution(b, x, target=px.LogitDiff(1, 2))):
        with pytest.raises(UnsupportedModelError, match="projector is an MLP"):
            method(be, images())
    with pytest.raises(PrismaError):  # the bare model: the methods need a prompt (llava.backend)
        px.activation_patching(llava, images(), images(seed=2), target=px.LogitDiff(1, 2))


# ------------------------------------------------------------------ inputs, batching, errors
def test_inputs_and_invokes(llava):
    inputs = llava.inputs(images(), PROMPT)
    n = llava.n_image_tokens
    assert inputs["input_ids"].shape == (2, len(PROMPT) - 1 + n)
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 2 * n
    name = "visual.blocks.1.hook_resid_post"
    with torch.no_grad():
        _, whole = llava.run_with_cache(**inputs, names_filter=[name, "lm.blocks.1.hook_resid_post"])
        with llava.trace() as tracer:
            with tracer.invoke(**{k: v[:1] for k, v in inputs.items()}):
                a = llava.site(name).save()
            with tracer.invoke(**{k: v[1:] for k, v in inputs.items()}):
                b = llava.site("lm.blocks.1.hook_resid_post").save()
    assert gap(a, whole[name][:1]) < ATOL and gap(b, whole["lm.blocks.1.hook_resid_post"][1:]) < ATOL
    with pytest.raises(InputError, match="image token"):
        llava.inputs(images(), [1, 5, 6])
    with pytest.raises(InputError, match="tokenize"):
        llava.inputs(images(), "a photo of a cat")
    ids = inputs["input_ids"].clone()
    ids[0, 1] = 2  # one image token too few for two images
    with pytest.raises(InputError, match="image tokens"):
        with llava.trace(**dict(inputs, input_ids=ids)):
            llava.output.save()
    with pytest.raises(UnknownNameError, match="hook_projected"):
        llava.run_with_cache(**inputs, names_filter="visual.hook_image_embed")


def snapshot(module):
    """Hooks (counts), train/eval modes, and every attention module's config object and kernel."""
    hooks = {n: tuple(len(getattr(m, k)) for k in ("_forward_hooks", "_forward_pre_hooks"))
             for n, m in module.named_modules()}
    modes = {n: m.training for n, m in module.named_modules()}
    attn = {n: (id(m.config), m.config._attn_implementation) for n, m in module.named_modules()
            if hasattr(m, "config") and type(m).__name__.endswith("Attention")}
    return hooks, modes, attn, module_hooks(module)


def attention_as_built(module):
    """Every tower attention module reads the tower's own config, whose kernel is not ours."""
    tower = module.model.vision_tower
    return all(layer.self_attn.config is tower.config for layer in tower.encoder.layers) and \
        tower.config._attn_implementation != "prisma_explicit"


def test_module_left_as_it_was(llava):
    """After a trace that reads patterns and edits, one that raises, a run_with_cache, refused
    inputs and a patching sweep (with part of the model in train mode), the module has the hooks,
    modes and attention configs it had."""
    module = llava._module
    module.model.language_model.train()
    try:
        before = snapshot(module)
        assert attention_as_built(module)
        inputs = llava.inputs(images(), PROMPT)
        patterns = [n for n in llava.site_names if n.endswith("hook_pattern")]
        with torch.no_grad():
            with llava.trace(**inputs):
                llava.prepare(patterns)
                for name in patterns:
                    llava.set_site(name, llava.site(name) * 1.0)
                llava.output.save()
        assert snapshot(module) == before
        with pytest.raises(RuntimeError, match="inside"):
            with torch.no_grad(), llava.trace(**inputs):
                llava.site(patterns[0])
                raise RuntimeError("raised inside the trace")
        assert snapshot(module) == before
        with torch.no_grad():
            llava.run_with_cache(**inputs)
        with pytest.raises(InputError):
            llava.run_with_cache(**dict(inputs, pixel_values=inputs["pixel_values"][:, :1]))
        assert snapshot(module) == before
        px.activation_patching(px.llava_backend(llava, PROMPT), images(1), images(1, seed=2), target=px.LogitDiff(1, 2),
                               sites=("resid_pre",), layers=[0], positions=[1], progress=False)
        assert snapshot(module) == before and attention_as_built(module)
    finally:
        module.eval()
