"""SAEs: SAELens's math and hook names, and its on-disk layout (5.x and 6.x) without sae-lens."""

from __future__ import annotations

import json

import pytest
import torch

from prisma_ext.errors import InputError
from prisma_ext.sae import SparseAutoencoder, load_saelens, save_saelens


def random_sae(architecture: str = "standard", d_in: int = 12, d_sae: int = 40, seed: int = 0, **kw):
    """Every parameter random (the threshold positive), so a swapped or dropped one shows."""
    sae = SparseAutoencoder(d_in, d_sae, architecture, k=5 if architecture == "topk" else None, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 0.3 if name == "threshold" else
                    torch.randn(p.shape, generator=gen) * 0.5)
    return sae


def inputs(d_in: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 7, d_in, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_a_saved_sae_loads_back_and_encodes_and_decodes_the_same(architecture, tmp_path):
    sae = random_sae(architecture)
    folder = save_saelens(sae, tmp_path / "sae", hook_name="blocks.1.hook_resid_post", model_name="builtin:shapes-vit")
    back, meta = load_saelens(folder)
    assert (back.architecture, back.k, back.d_in, back.d_sae) == (sae.architecture, sae.k, 12, 40)
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["model_name"] == "builtin:shapes-vit"
    x = inputs()
    torch.testing.assert_close(back.encode(x), sae.encode(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(back.decode(sae.encode(x)), sae.decode(sae.encode(x)), atol=1e-6, rtol=0)


def test_the_files_are_laid_out_as_saelens_6_writes_them(tmp_path):
    from safetensors.torch import load_file

    folder = save_saelens(random_sae("topk"), tmp_path / "sae", hook_name="blocks.0.hook_resid_pre")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 5 and (cfg["d_in"], cfg["d_sae"]) == (12, 40)
    meta = cfg["metadata"]
    assert meta["sae_lens_version"].startswith("6.") and meta["hook_name"] == "blocks.0.hook_resid_pre"
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True and cfg["dtype"] == "float32"
    shapes = {k: tuple(v.shape) for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    assert shapes == {"W_enc": (12, 40), "b_enc": (40,), "W_dec": (40, 12), "b_dec": (12,)}


def test_the_encoders_follow_saelens_math():
    x = inputs()
    for architecture in ("standard", "topk", "jumprelu"):
        sae = random_sae(architecture)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # b_dec subtracted from the input (SAELens's default)
        acts = sae.encode(x)
        if architecture == "standard":
            torch.testing.assert_close(acts, pre.relu())
        elif architecture == "topk":  # the k largest pre-activations, then ReLU: at most k non-zero
            top = pre.topk(5, dim=-1).indices
            kept = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, top, True)
            torch.testing.assert_close(acts, torch.where(kept, pre.relu(), 0.0))
            assert int((acts > 0).sum(-1).max()) <= 5
        else:  # strictly above the threshold
            torch.testing.assert_close(acts, torch.where(pre > sae.threshold, pre.relu(), 0.0))
        torch.testing.assert_close(sae.decode(acts), acts @ sae.W_dec + sae.b_dec)
    raw = random_sae(apply_b_dec_to_input=False)
    torch.testing.assert_close(raw.encode(x), (x @ raw.W_enc + raw.b_enc).relu())


def test_the_error_term_gives_the_input_back_and_hooks_carry_saelens_names():
    sae = random_sae("topk", use_error_term=True)
    x = inputs()
    torch.testing.assert_close(sae(x), x, atol=1e-6, rtol=0)
    assert set(sae.hook_dict) == {"hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
                                  "hook_sae_error", "hook_sae_output"}
    _, cache = sae.run_with_cache(x)
    torch.testing.assert_close(cache["hook_sae_error"], x - sae.decode(sae.encode(x)), atol=1e-6, rtol=0)
    # ablating every latent leaves the bias plus the error term: the edit reaches the output
    out = sae.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post", lambda acts, hook: torch.zeros_like(acts))])
    torch.testing.assert_close(out, sae.b_dec + cache["hook_sae_error"], atol=1e-6, rtol=0)
    sae.use_error_term = False
    torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)))


def test_a_saelens_5_config_loads(tmp_path):
    from safetensors.torch import save_file

    sae = random_sae("topk")
    folder = tmp_path / "v5"
    folder.mkdir()
    cfg = {"architecture": "standard", "d_in": 12, "d_sae": 40, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 5}, "apply_b_dec_to_input": True, "hook_point": "blocks.3.hook_resid_post",
           "hook_layer": 3, "model_name": "vit", "normalize_activations": False, "dtype": "torch.float32",
           "finetuning_scaling_factor": False}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = {k: v.detach() for k, v in sae.named_parameters()} | {"finetuning_scaling_factor": torch.ones(40)}
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    back, meta = load_saelens(folder)
    assert back.architecture == "topk" and back.k == 5 and meta["hook_name"] == "blocks.3.hook_resid_post"
    torch.testing.assert_close(back.encode(inputs()), sae.encode(inputs()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("change, needle", [
    ({"architecture": "gated"}, "architecture 'gated' is not supported"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations=.expected_average_only_in. is not"),
    ({"k": None}, "needs k"),
    ({"d_sae": 41}, "W_enc is (12, 40)"),
    ({"dtype": "int8"}, "dtype 'int8'"),
])
def test_unsupported_or_inconsistent_configs_are_refused_by_name(change, needle, tmp_path):
    folder = save_saelens(random_sae("topk"), tmp_path / "sae", hook_name="h")
    cfg = json.loads((folder / "cfg.json").read_text()) | change
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_saelens(folder)


def test_bad_files_are_clear_errors_and_saving_replaces_nothing(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_saelens(tmp_path / "nothing")
    folder = save_saelens(random_sae(), tmp_path / "sae", hook_name="h")
    before = (folder / "sae_weights.safetensors").read_bytes()
    with pytest.raises(InputError, match="already holds cfg.json, sae_weights.safetensors"):
        save_saelens(random_sae(seed=5), folder, hook_name="h")
    assert (folder / "sae_weights.safetensors").read_bytes() == before
    (folder / "sae_weights.safetensors").write_bytes(before[: len(before) // 2])  # a partial file
    with pytest.raises(InputError, match="cannot be read"):
        load_saelens(folder)
    with pytest.raises(InputError, match=r"expected \[\.\.\., d_in=12\]"):
        random_sae().encode(torch.zeros(2, 13))


def test_a_run_time_layer_norm_is_applied_before_encoding_and_undone_after_decoding(tmp_path):
    sae = random_sae("topk", normalize_activations="layer_norm")
    x = inputs() * 4
    shifted = x * 3 + 2  # per token an affine change: the latents are the same, the output follows it
    torch.testing.assert_close(sae.encode(shifted), sae.encode(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae(shifted), sae(x) * 3 + 2, atol=1e-3, rtol=1e-4)
    back, _ = load_saelens(save_saelens(sae, tmp_path / "ln", hook_name="h"))
    assert back.normalize_activations == "layer_norm"
    torch.testing.assert_close(back(x), sae(x), atol=1e-6, rtol=0)
    fresh = random_sae(normalize_activations="layer_norm")
    with pytest.raises(InputError, match="decode the latents of the last encode"):
        fresh.decode(torch.zeros(2, 40))


def test_saved_files_get_the_permissions_a_plain_write_gives(tmp_path):
    """safetensors writes 0o600 on its own; save_saelens's files are readable like any file."""
    import os

    folder = save_saelens(random_sae("standard"), tmp_path / "sae", hook_name="blocks.0.hook_resid_post")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("cfg.json", "sae_weights.safetensors"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
