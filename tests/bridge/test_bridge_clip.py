"""TransformerBridge adapters for HF CLIP: registration, equivalence with HF, live hooks."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import torch

from tests.support.models import randomize_

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformer_lens.factories.architecture_adapter_factory import (  # noqa: E402
    ArchitectureAdapterFactory,
)
from transformer_lens.model_bridge.sources import build_bridge_from_module  # noqa: E402

import prisma_ext.bridge as px_bridge  # noqa: E402
from prisma_ext.bridge.clip import (  # noqa: E402
    ADAPTERS,
    CLIPArchitectureAdapter,
    CLIPAttentionBridge,
    CLIPVisionArchitectureAdapter,
    eos_positions,
    set_use_attn_result,
)

ATOL = 1e-4
ROOT = Path(__file__).resolve().parents[2]
IMPLS = ["sdpa", "eager"]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8, hidden_act="quick_gelu")
# The text tower differs from the vision tower in width, depth and heads on purpose.
TEXT = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=3,
            vocab_size=100, max_position_embeddings=16, hidden_act="quick_gelu")
# Row 0: its largest id (97) comes before its first eos (50), so the two pooling rules differ.
IDS = torch.tensor([[5, 97, 11, 50, 50, 0, 0], [7, 8, 9, 10, 11, 12, 50]])
MASK = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])


@pytest.fixture(scope="module", autouse=True)
def registered():
    return px_bridge.register()


def _pixels(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def clip_model(impl: str, eos_token_id: int = 50) -> transformers.CLIPModel:
    cfg = transformers.CLIPConfig(text_config={**TEXT, "eos_token_id": eos_token_id},
                                  vision_config=VISION, projection_dim=20)
    model = transformers.CLIPModel._from_config(cfg, attn_implementation=impl)
    return randomize_(model.eval(), seed=3)


def vision_model(cls: type, impl: str):
    cfg = transformers.CLIPVisionConfig(**VISION, projection_dim=20)
    return randomize_(cls._from_config(cfg, attn_implementation=impl).eval(), seed=4)


def bridged(model):
    """(bridge, untouched copy of the HF model): the bridge rewires the model in place."""
    ref = copy.deepcopy(model)
    arch = type(model).__name__
    return build_bridge_from_module(model, arch, hf_config=model.config), ref


@functools.cache
def shared_clip(impl: str, eos_token_id: int = 50):
    """A bridged CLIPModel for tests that leave it as they found it (hooks are temporary)."""
    return bridged(clip_model(impl, eos_token_id))


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=0)


def nudge(t: torch.Tensor, hook=None) -> torch.Tensor:
    """A fixed, non-affine edit (LayerNorm undoes affine ones)."""
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(7))
    return t + noise.to(t.dtype)


def embeds(out) -> torch.Tensor:
    return torch.cat([out.image_embeds.flatten(), out.text_embeds.flatten()])


# -- registration ---------------------------------------------------------------------------


def test_import_is_light():
    code = "import sys, prisma_ext.bridge; assert 'transformer_lens' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_register_is_idempotent():
    assert px_bridge.ARCHITECTURES == tuple(ADAPTERS)
    assert px_bridge.register() == px_bridge.ARCHITECTURES
    assert px_bridge.register() == px_bridge.ARCHITECTURES
    for name, adapter in ADAPTERS.items():
        assert ArchitectureAdapterFactory._adapters[name] is adapter


def test_register_leaves_foreign_adapters_alone(monkeypatch):
    class Other(CLIPArchitectureAdapter):
        pass

    monkeypatch.setitem(ArchitectureAdapterFactory._adapters, "CLIPModel", Other)
    assert "CLIPModel" not in px_bridge.register()
    assert ArchitectureAdapterFactory._adapters["CLIPModel"] is Other
    assert "CLIPModel" in px_bridge.register(override=True)
    assert ArchitectureAdapterFactory._adapters["CLIPModel"] is CLIPArchitectureAdapter


def test_entry_point_discovery_without_importing_prisma_ext(tmp_path):
    """TL 4.3 reads the `transformer_lens.architectures` group: a fake installed distribution
    declaring our adapters is enough, with no `import prisma_ext` in the user's script."""
    info = tmp_path / "clip_bridge_probe-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clip-bridge-probe\nVersion: 0.0\n")
    lines = [f"{name} = prisma_ext.bridge.clip:{cls.__name__}" for name, cls in ADAPTERS.items()]
    (info / "entry_points.txt").write_text(
        "[transformer_lens.architectures]\n" + "\n".join(lines) + "\n"
    )
    script = textwrap.dedent("""
        import torch, transformers
        from transformer_lens.model_bridge.sources import build_bridge_from_module
        cfg = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
        model = transformers.CLIPVisionModel(cfg).eval()
        bridge = build_bridge_from_module(model, "CLIPVisionModel", hf_config=cfg)
        assert type(bridge.adapter).__module__ == "prisma_ext.bridge.clip"
        assert bridge(torch.randn(1, 3, 16, 16)).shape == (1, 5, 16)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)


def test_installed_entry_points_name_our_adapters():
    """Once pyproject.toml declares the entry points and the package is reinstalled."""
    try:
        eps = metadata.distribution("prisma-ext").entry_points
    except metadata.PackageNotFoundError:
        pytest.skip("prisma-ext is not installed")
    ours = {ep.name: ep for ep in eps if ep.group == "transformer_lens.architectures"}
    if not ours:
        pytest.skip("no transformer_lens.architectures entry points in the installed metadata")
    assert {name: ep.load() for name, ep in ours.items()} == ADAPTERS


# -- CLIPModel ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_clip_model_forward_matches_hf(impl):
    bridge, ref = shared_clip(impl)
    px = _pixels()
    with torch.no_grad():
        want = ref(input_ids=IDS, pixel_values=px, attention_mask=MASK)
        got = bridge(IDS, pixel_values=px, attention_mask=MASK)
    assert isinstance(got, transformers.models.clip.modeling_clip.CLIPOutput)
    for field in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
        assert close(getattr(got, field), getattr(want, field)), field


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("eos_token_id", [2, 50])
def test_clip_model_cache_matches_hf_hidden_states(impl, eos_token_id):
    bridge, ref = shared_clip(impl, eos_token_id)
    px = _pixels()
    with torch.no_grad():
        want = ref(input_ids=IDS, pixel_values=px, attention_mask=MASK, output_hidden_states=True)
        vision = ref.vision_model(pixel_values=px)
        text = ref.text_model(input_ids=IDS, attention_mask=MASK)
        out, cache = bridge.run_with_cache(IDS, pixel_values=px, attention_mask=MASK)
    assert close(out.logits_per_image, want.logits_per_image)
    for tower, states in (("visual", want.vision_model_output.hidden_states),
                          ("text", want.text_model_output.hidden_states)):
        n_layers = len(states) - 1
        for i in range(n_layers):
            assert close(cache[f"{tower}.blocks.{i}.hook_resid_pre"], states[i]), (tower, i)
        assert close(cache[f"{tower}.blocks.{n_layers - 1}.hook_resid_post"], states[-1]), tower

    # Vision: embeddings -> ln_pre -> blocks; post_layernorm on the CLS token only.
    assert close(cache["visual.ln_pre.hook_in"], cache["visual.hook_embed"])
    assert close(cache["visual.ln_pre.hook_out"], cache["visual.blocks.0.hook_resid_pre"])
    assert close(cache["visual.ln_final.hook_in"], cache["visual.blocks.1.hook_resid_post"][:, 0])
    assert close(cache["visual.ln_final.hook_out"], vision.pooler_output)
    assert close(cache["visual.hook_out"], vision.pooler_output)
    assert close(cache["visual_proj.hook_out"], ref.get_image_features(pixel_values=px).pooler_output)

    # Text: token + position embeddings; final LN on every token; pooled at the EOS position.
    assert close(cache["text.hook_embed"] + cache["text.hook_pos_embed"],
                 cache["text.blocks.0.hook_resid_pre"])
    assert close(cache["text.ln_final.hook_out"], text.last_hidden_state)
    rows = torch.arange(len(IDS))
    pooled = cache["text.ln_final.hook_out"][rows, eos_positions(IDS, eos_token_id)]
    assert close(pooled, text.pooler_output)
    assert close(cache["text.hook_out"], text.pooler_output)
    feats = ref.get_text_features(input_ids=IDS, attention_mask=MASK).pooler_output
    assert close(cache["text_proj.hook_out"], feats)


def test_eos_positions_rules():
    assert eos_positions(IDS, 2).tolist() == [1, 6]  # legacy configs: the largest id
    assert eos_positions(IDS, 50).tolist() == [3, 6]  # the first eos_token_id


def test_tower_heads_follow_their_own_config():
    bridge, _ = shared_clip("eager")
    with torch.no_grad():
        _, cache = bridge.run_with_cache(IDS, pixel_values=_pixels(2), attention_mask=MASK)
    assert cache["visual.blocks.0.attn.hook_q"].shape == (2, 17, 2, 16)
    assert cache["visual.blocks.0.attn.hook_pattern"].shape == (2, 2, 17, 17)
    assert cache["text.blocks.0.attn.hook_z"].shape == (2, 7, 3, 8)
    assert cache["text.blocks.2.attn.hook_pattern"].shape == (2, 3, 7, 7)


# -- CLIPVisionModel / CLIPVisionModelWithProjection ----------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_proj", [False, True])
def test_vision_model_matches_hf(impl, with_proj):
    cls = transformers.CLIPVisionModelWithProjection if with_proj else transformers.CLIPVisionModel
    bridge, ref = bridged(vision_model(cls, impl))
    px = _pixels()
    with torch.no_grad():
        want = ref(pixel_values=px, output_hidden_states=True)
        assert close(bridge(px), want.last_hidden_state)  # like TL's ViTModel bridge
        _, cache = bridge.run_with_cache(px)
    for i in range(2):
        assert close(cache[f"blocks.{i}.hook_resid_pre"], want.hidden_states[i])
    assert close(cache["blocks.1.hook_resid_post"], want.last_hidden_state)
    assert close(cache["hook_embed"], cache["ln_pre.hook_in"])
    pooled = cache["ln_final.hook_out"]
    if with_proj:
        assert close(cache["visual_proj.hook_in"], pooled)
        assert close(cache["visual_proj.hook_out"], want.image_embeds)
    else:
        assert close(pooled, want.pooler_output)


# -- attention hooks: SDPA vs eager ---------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_pattern_hooks_fire_and_edits_count_under_both_kernels(impl):
    bridge, _ = shared_clip(impl)
    px = _pixels(2)
    with torch.no_grad():
        base = bridge(IDS, pixel_values=px, attention_mask=MASK)
        _, cache = bridge.run_with_cache(IDS, pixel_values=px, attention_mask=MASK)
    scores = cache["text.blocks.0.attn.hook_attn_scores"]
    pattern = cache["text.blocks.0.attn.hook_pattern"]
    assert close(torch.softmax(scores, dim=-1), pattern, atol=1e-6)  # scores are pre-softmax
    assert close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)), atol=1e-5)
    assert pattern.triu(1).abs().max() == 0  # causal text tower
    assert pattern[0, :, :, 4:].abs().max() == 0  # padding of row 0 gets no attention
    assert cache["visual.blocks.0.attn.hook_pattern"].tril(-1).abs().max() > 0  # bidirectional
    assert "visual.blocks.0.attn.hook_result" not in cache  # gated off, as in TL

    def attend_to_last(t, hook):
        t = torch.zeros_like(t)
        t[..., -1] = 1
        return t

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # no "edit is discarded" warning from TL
        edited = bridge.run_with_hooks(IDS, pixel_values=px, attention_mask=MASK, fwd_hooks=[
            ("visual.blocks.1.attn.hook_pattern", attend_to_last)])
    assert (embeds(edited) - embeds(base)).abs().max() > 1e-2


def test_hf_kernel_runs_unless_pattern_scores_or_result_are_hooked(monkeypatch):
    calls = []
    original = CLIPAttentionBridge._explicit

    def counting(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CLIPAttentionBridge, "_explicit", counting)
    bridge, ref = bridged(vision_model(transformers.CLIPVisionModel, "sdpa"))
    px = _pixels(2)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(px, names_filter=lambda n: "resid" in n)
        assert calls == []
        assert torch.equal(cache["blocks.1.hook_resid_post"], ref(pixel_values=px).last_hidden_state)
        bridge.run_with_cache(px, names_filter="blocks.1.attn.hook_pattern")
    assert len(calls) == 1


def test_explicit_attention_matches_sdpa_kernel():
    bridge, ref = bridged(vision_model(transformers.CLIPVisionModel, "sdpa"))
    px = _pixels()
    with torch.no_grad():
        out, cache = bridge.run_with_cache(px)  # every hook point hooked: explicit path
        want = ref(pixel_values=px, output_hidden_states=True)
    assert "blocks.0.attn.hook_pattern" in cache
    assert close(out, want.last_hidden_state)


def test_per_head_result_is_live():
    bridge, ref = bridged(vision_model(transformers.CLIPVisionModel, "sdpa"))
    bridge.set_use_attn_result(True)  # TL's setter reaches a top-level `blocks`
    px = _pixels(2)
    with torch.no_grad():
        out, cache = bridge.run_with_cache(px)
        result = cache["blocks.0.attn.hook_result"]
        assert result.shape == (2, 17, 2, 32)
        bias = bridge.blocks[0].attn.o.original_component.bias
        assert close(result.sum(-2) + bias, cache["blocks.0.hook_attn_out"], atol=1e-5)
        assert close(out, ref(pixel_values=px).last_hidden_state)

        def drop_head_0(t, hook):
            t = t.clone()
            t[:, :, 0] = 0
            return t

        edited = bridge.run_with_hooks(px, fwd_hooks=[("blocks.1.attn.hook_result", drop_head_0)])
    assert (edited - out).abs().max() > 1e-2


def test_per_head_result_in_both_towers():
    bridge, ref = bridged(clip_model("sdpa"))
    with pytest.raises(NotImplementedError):
        bridge.set_use_attn_result(True)  # TL's own setter: no top-level `blocks`
    set_use_attn_result(bridge)
    px = _pixels(2)
    with torch.no_grad():
        out, cache = bridge.run_with_cache(IDS, pixel_values=px, attention_mask=MASK)
        want = ref(input_ids=IDS, pixel_values=px, attention_mask=MASK)
    assert cache["visual.blocks.1.attn.hook_result"].shape == (2, 17, 2, 32)
    assert cache["text.blocks.2.attn.hook_result"].shape == (2, 7, 3, 24)
    assert close(out.logits_per_image, want.logits_per_image)
    set_use_attn_result(bridge, False)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(IDS, pixel_values=px, attention_mask=MASK)
    assert not any(name.endswith("hook_result") for name in cache)


def test_resid_mid_edit_reaches_the_residual_stream():
    """Patching resid_mid replaces the residual itself, not just the MLP's input."""
    bridge, ref = bridged(vision_model(transformers.CLIPVisionModel, "eager"))
    px = _pixels(2)
    patch = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = bridge.run_with_hooks(px, fwd_hooks=[("blocks.0.hook_resid_mid", lambda t, hook: patch)])
        layer0, layer1 = ref.encoder.layers
        want = layer1(patch + layer0.mlp(layer0.layer_norm2(patch)), None)
        _, cache = bridge.run_with_cache(px)
    assert close(got, want)
    assert close(cache["blocks.0.hook_resid_mid"],
                 cache["blocks.0.hook_resid_pre"] + cache["blocks.0.hook_attn_out"])
    assert close(cache["blocks.0.hook_resid_post"],
                 cache["blocks.0.hook_resid_mid"] + cache["blocks.0.hook_mlp_out"])


# -- other hook points are real -------------------------------------------------------------


@pytest.mark.parametrize("site", [
    "visual.hook_embed", "visual.ln_pre.hook_out", "visual.blocks.0.hook_resid_mid",
    "visual.blocks.1.attn.hook_z", "visual.blocks.0.mlp.hook_post",
    "visual.ln_final.hook_normalized", "visual.hook_out", "visual_proj.hook_out",
    "text.hook_pos_embed", "text.blocks.1.attn.hook_v", "text.blocks.2.hook_resid_post",
    "text.ln_final.hook_out",
])
def test_editing_a_site_changes_the_output(site):
    bridge, _ = shared_clip("sdpa")
    px = _pixels(2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TL notes that an edited LN is recomputed in python
        base = bridge(IDS, pixel_values=px, attention_mask=MASK)
        edited = bridge.run_with_hooks(IDS, pixel_values=px, attention_mask=MASK,
                                       fwd_hooks=[(site, nudge)])
    assert (embeds(edited) - embeds(base)).abs().max() > 1e-2


def test_hooks_fire_when_calling_hf_methods_directly():
    bridge, ref = shared_clip("sdpa")
    model = bridge.original_model
    px = _pixels(2)
    seen = {}
    with torch.no_grad(), bridge.hooks(fwd_hooks=[
        ("visual.blocks.1.hook_resid_post", lambda t, hook: seen.setdefault(hook.name, t))
    ]):
        feats = model.get_image_features(pixel_values=px).pooler_output
    assert seen
    assert close(feats, ref.get_image_features(pixel_values=px).pooler_output)


def test_left_padding_needs_explicit_position_ids():
    """TL derives position ids from a left-padded mask; HF CLIP does not. Pass them."""
    bridge, ref = shared_clip("eager")
    ids = torch.tensor([[0, 0, 5, 97, 50], [7, 8, 9, 10, 50]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    px = _pixels(2)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=px, attention_mask=mask).logits_per_image
        shifted = bridge(ids, pixel_values=px, attention_mask=mask).logits_per_image
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        fixed = bridge(ids, pixel_values=px, attention_mask=mask, position_ids=positions)
    assert not close(shifted, want)
    assert close(fixed.logits_per_image, want)


def test_compatibility_mode_without_weight_processing():
    bridge, ref = bridged(vision_model(transformers.CLIPVisionModel, "eager"))
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    px = _pixels()
    with torch.no_grad():
        out, cache = bridge.run_with_cache(px)
        want = ref(pixel_values=px)
    assert close(out, want.last_hidden_state)
    assert close(cache["ln_final.hook_out"], want.pooler_output)


def test_adapter_flags():
    bridge, _ = shared_clip("sdpa")
    assert isinstance(bridge.adapter, CLIPArchitectureAdapter)
    assert bridge.cfg.is_multimodal and not bridge.cfg.is_visual_model
    assert bridge.cfg.act_fn == "quick_gelu"
    vbridge, _ = bridged(vision_model(transformers.CLIPVisionModel, "sdpa"))
    assert isinstance(vbridge.adapter, CLIPVisionArchitectureAdapter)
    assert vbridge.cfg.is_visual_model
    assert vbridge.W_Q.shape == (2, 2, 32, 16)
