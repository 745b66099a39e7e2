"""ViT-Prisma's released SAE checkpoints: `config.json` next to a weights file (`n_images_<N>.pt`).

    sae, info = load_vit_prisma("folder/n_images_2600058.pt")   # or the folder, if it holds one .pt
    info["hook_name"]   # "blocks.9.hook_resid_post", from hook_point_layer and layer_subtype

config.json is ViT-Prisma's `VisionModelSAERunnerConfig` as `save_config` writes it: d_in and
expansion_factor (d_sae = d_in * expansion_factor), architecture, activation_fn_str ("relu" or
"topk" with activation_fn_kwargs.k), normalize_activations (default "layer_norm"),
hook_point_layer + layer_subtype, and which tokens it was trained on (cls_token_only,
use_patches_only), model_name. The weights are SAELens's names and orientation (W_enc [d_in,
d_sae], b_enc, W_dec [d_sae, d_in], b_dec); ViT-Prisma always subtracts b_dec from the input.
The weights file may be a bare state dict or {"state_dict": ..., "cfg": ...}; one whose config is
a pickled ViT-Prisma object cannot be read without vit_prisma and is refused by name (it is
opened with `weights_only=True`, so nothing in it runs). Gated, JumpReLU (which ViT-Prisma itself
does not load), transcoders and the tanh-relu activation are refused by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .dictionary import NORMALIZATIONS, SparseAutoencoder

PRISMA_DEFAULTS = {"architecture": "standard", "activation_fn_str": "topk", "normalize_activations": "layer_norm",
                   "layer_subtype": "ln2.hook_normalized", "expansion_factor": 16}
INFO_KEYS = ("model_name", "model_class_name", "context_size", "cls_token_only", "use_patches_only",
             "hook_point_head_index")


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"load_vit_prisma: {path} does not exist")
    found = sorted(p for p in path.glob("*.pt") if not p.name.endswith("_log_feature_sparsity.pt"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise InputError(f"load_vit_prisma: {path} should hold one weights file (*.pt); found {names}: name the file")
    return found[0]


def load_vit_prisma(path: str | os.PathLike, device: Any = "cpu") -> tuple[SparseAutoencoder, dict[str, Any]]:
    """A ViT-Prisma SAE checkpoint: (the SAE, info: hook_name, model_name, which tokens ...)."""
    weights = _weights_file(Path(path))
    config = weights.parent / "config.json"
    if not config.is_file():
        raise InputError(f"load_vit_prisma: {config} does not exist (ViT-Prisma keeps its config.json next to the "
                         "weights)")
    try:
        cfg = PRISMA_DEFAULTS | json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"load_vit_prisma: {config} is not JSON ({err})") from None
    sae = _build(cfg, config)
    state = _state_dict(weights)
    expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    got = {name: tuple(t.shape) for name, t in state.items() if isinstance(t, torch.Tensor)}
    if got != expected:
        raise InputError(f"load_vit_prisma: {weights} holds {got}; config.json (d_in={sae.d_in}, d_sae={sae.d_sae}) "
                         f"makes a standard SAE of {expected}")
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(state[name].to(p.dtype))
    info = {key: cfg[key] for key in INFO_KEYS if key in cfg}
    info["hook_name"] = f"blocks.{cfg['hook_point_layer']}.{cfg['layer_subtype']}"
    return sae.to(device), info


def _build(cfg: dict, path: Path) -> SparseAutoencoder:
    if cfg.get("is_transcoder"):
        raise InputError(f"load_vit_prisma: {path}: transcoders are not supported")
    if cfg["architecture"] != "standard":
        raise InputError(f"load_vit_prisma: {path}: architecture {cfg['architecture']!r} is not supported (standard "
                         "SAEs with relu or topk are)")
    activation = cfg["activation_fn_str"]
    if activation not in ("relu", "topk"):
        raise InputError(f"load_vit_prisma: {path}: activation_fn_str {activation!r} is not supported (relu, topk are)")
    norm = cfg["normalize_activations"] if cfg["normalize_activations"] in NORMALIZATIONS else "none"
    for key in ("d_in", "expansion_factor", "hook_point_layer"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int):
            raise InputError(f"load_vit_prisma: {path}: {key} must be an int, got {cfg.get(key)!r}")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k") if activation == "topk" else None
    if activation == "topk" and k is None:
        raise InputError(f"load_vit_prisma: {path}: a topk SAE needs activation_fn_kwargs.k")
    return SparseAutoencoder(cfg["d_in"], cfg["d_in"] * cfg["expansion_factor"],
                             "topk" if activation == "topk" else "standard", k, apply_b_dec_to_input=True,
                             normalize_activations=norm)


def _state_dict(weights: Path) -> dict:
    import pickle

    try:
        blob = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(f"load_vit_prisma: {weights} pickles more than tensors (ViT-Prisma's trainer stores its "
                         "config object in the file, which needs vit_prisma to read): save its 'state_dict' alone "
                         f"next to config.json ({str(err).splitlines()[0]})") from None
    except (RuntimeError, OSError, EOFError) as err:
        raise InputError(f"load_vit_prisma: {weights} cannot be read ({err})") from None
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict):
        raise InputError(f"load_vit_prisma: {weights} holds a {type(blob).__name__}, not a state dict")
    if "b_gate" in blob:
        raise InputError(f"load_vit_prisma: {weights} is a gated SAE (b_gate, b_mag, r_mag), not supported")
    return dict(blob)
