"""ViT-Prisma's SAE checkpoints (config.json next to n_images_<N>.pt), written here the way its
trainer writes them, load and compute what ViT-Prisma computes; they also move to SAELens's layout."""

from __future__ import annotations

import json

import pytest
import torch

from prisma_ext.errors import InputError
from prisma_ext.sae import load_saelens, load_vit_prisma, save_saelens

D_IN, EXPANSION = 12, 4


class PrismaConfig:  # stands in for ViT-Prisma's pickled config object
    pass


def write_checkpoint(folder, activation="topk", normalize="layer_norm", seed=0, legacy=False, **cfg):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"d_in": D_IN, "expansion_factor": EXPANSION, "architecture": "standard",
              "activation_fn_str": activation, "activation_fn_kwargs": {"k": 6} if activation == "topk" else {},
              "normalize_activations": normalize, "hook_point_layer": 9, "layer_subtype": "hook_resid_post",
              "model_name": "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", "cls_token_only": False,
              "use_patches_only": True, "context_size": 50, "lr": 4e-4, "_dtype": "float32", **cfg}
    (folder / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(seed)
    d_sae = D_IN * EXPANSION
    state = {"W_enc": torch.randn(D_IN, d_sae, generator=gen), "b_enc": torch.randn(d_sae, generator=gen),
             "W_dec": torch.randn(d_sae, D_IN, generator=gen), "b_dec": torch.randn(D_IN, generator=gen)}
    blob = {"cfg": PrismaConfig(), "state_dict": state} if legacy else state
    torch.save(blob, folder / "n_images_2600058.pt")
    torch.save(torch.zeros(d_sae), folder / "n_images_2600058_log_feature_sparsity.pt")
    return folder / "n_images_2600058.pt", state


def prisma_forward(state, x, activation="topk", k=6):
    """ViT-Prisma's encode/decode with layer_norm: normalise (unbiased std + 1e-5), subtract b_dec,
    encode, activate, decode, undo the normalisation (x * std + mean)."""
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    sae_in = (x - mu) / (std + 1e-5) - state["b_dec"]
    pre = sae_in @ state["W_enc"] + state["b_enc"]
    if activation == "topk":
        top = pre.topk(k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:
        acts = pre.relu()
    return acts, (acts @ state["W_dec"] + state["b_dec"]) * std + mu


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_a_checkpoint_loads_and_computes_what_vit_prisma_computes(activation, tmp_path):
    weights, state = write_checkpoint(tmp_path / "ckpt", activation)
    sae, info = load_vit_prisma(tmp_path / "ckpt")  # the folder: its one weights file is found
    assert (sae.d_in, sae.d_sae, sae.normalize_activations) == (D_IN, D_IN * EXPANSION, "layer_norm")
    assert info["hook_name"] == "blocks.9.hook_resid_post" and info["use_patches_only"] is True
    x = torch.randn(2, 50, D_IN, generator=torch.Generator().manual_seed(3)) * 3 + 1
    want_acts, want_out = prisma_forward(state, x, activation)
    torch.testing.assert_close(sae.encode(x), want_acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), want_out, atol=1e-5, rtol=1e-5)
    sae.use_error_term = True
    torch.testing.assert_close(sae(x), x, atol=1e-4, rtol=1e-5)  # recon - clean recon: float noise of a large recon


def test_a_vit_prisma_sae_moves_to_the_saelens_layout_unchanged(tmp_path):
    weights, _ = write_checkpoint(tmp_path / "ckpt")
    sae, info = load_vit_prisma(weights)
    back, meta = load_saelens(save_saelens(sae, tmp_path / "saelens", hook_name=info["hook_name"],
                                           model_name=info["model_name"]))
    x = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(4))
    assert back.normalize_activations == "layer_norm" and meta["hook_name"] == "blocks.9.hook_resid_post"
    torch.testing.assert_close(back(x), sae(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(back.encode(x), sae.encode(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("change, needle", [
    ({"architecture": "gated"}, "architecture 'gated' is not supported"),
    ({"activation_fn_str": "tanh-relu"}, "activation_fn_str 'tanh-relu'"),
    ({"is_transcoder": True}, "transcoders are not supported"),
    ({"expansion_factor": 5}, "config.json"),
])
def test_unsupported_or_inconsistent_checkpoints_are_refused_by_name(change, needle, tmp_path):
    weights, _ = write_checkpoint(tmp_path / "ckpt", **change)
    with pytest.raises(InputError, match=needle):
        load_vit_prisma(weights)


def test_a_pickled_config_object_is_refused_without_running_it(tmp_path):
    weights, _ = write_checkpoint(tmp_path / "ckpt", legacy=True)
    with pytest.raises(InputError, match="pickles more than tensors"):
        load_vit_prisma(weights)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_vit_prisma(tmp_path / "nothing")
    weights, _ = write_checkpoint(tmp_path / "ckpt")
    torch.save({}, tmp_path / "ckpt" / "n_images_5.pt")
    with pytest.raises(InputError, match="should hold one weights file"):
        load_vit_prisma(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(InputError, match="config.json does not exist"):
        load_vit_prisma(weights)
