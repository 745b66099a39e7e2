"""SAEs on disk in SAELens's layout, without depending on sae-lens (it pins transformer_lens<4).

    save_saelens(sae, "my-sae", hook_name="blocks.9.hook_resid_post", model_name="timm:vit_base_patch16_224")
    sae, info = load_saelens("my-sae")      # info: hook_name, model_name, ... (cfg.json's metadata)

A folder holds `cfg.json` and `sae_weights.safetensors`, as SAELens 6.x writes them: the core
fields at the top (d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
reshape_activations, architecture, and k for topk) and the rest under "metadata" with
`sae_lens_version` (without it SAELens reads the file as 5.x). Loading also takes SAELens 5.x
files (flat: hook_name at the top, `activation_fn: "topk"` with `activation_fn_kwargs.k`).
What this toolkit does not run is refused by name: gated SAEs and transcoders, run-time
activation normalisation, reshaped (hook_z) inputs, a 5.x scaling factor that is not all ones.
Saving never replaces a file: an existing cfg.json or weights file is an error unless
`overwrite=True`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .._files import replacing
from ..errors import InputError
from .dictionary import ARCHITECTURES, NORMALIZATIONS, SparseAutoencoder

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"  # the format written: SAELens >= 6 reads it as its own
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def save_saelens(sae: SparseAutoencoder, folder: str | os.PathLike, hook_name: str, model_name: str = "",
                 metadata: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write `sae` as SAELens 6.x does; `hook_name` is the site it reads (e.g.
    "blocks.9.hook_resid_post"), `metadata` extra keys for cfg.json's metadata. Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    targets = [folder / CFG, folder / WEIGHTS]
    existing = [p.name for p in targets if p.exists()]
    if existing and not overwrite:
        raise InputError(f"save_saelens: {folder} already holds {', '.join(existing)}; pass overwrite=True to "
                         "replace them")
    cfg = {"d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": _dtype_name(sae.W_enc.dtype), "device": "cpu",
           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": sae.normalize_activations,
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
                        "model_name": model_name, "hook_name": hook_name, "hook_head_index": None,
                        "prepend_bos": False, **(metadata or {})},
           "architecture": sae.architecture}
    if sae.architecture == "topk":
        cfg |= {"k": sae.k, "rescale_acts_by_decoder_norm": False}
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().cpu().contiguous() for name, p in sae.named_parameters()}
    with replacing(folder / WEIGHTS) as tmp:  # whole files only, with the usual permissions
        save_file(tensors, str(tmp))
    with replacing(folder / CFG) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def load_saelens(folder: str | os.PathLike, device: Any = "cpu") -> tuple[SparseAutoencoder, dict[str, Any]]:
    """An SAE saved by SAELens (5.x or 6.x) or by `save_saelens`: (the SAE, its metadata:
    hook_name, model_name, ...). Errors name the file and the field."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CFG, WEIGHTS):
        if not (folder / name).is_file():
            raise InputError(f"load_saelens: {folder / name} does not exist (an SAELens folder holds {CFG} and "
                             f"{WEIGHTS})")
    try:
        cfg = json.loads((folder / CFG).read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"load_saelens: {folder / CFG} is not JSON ({err})") from None
    arch, k, meta = _read_config(cfg, folder / CFG)
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise InputError(f"load_saelens: {folder / WEIGHTS} cannot be read ({err})") from None
    tensors = _canonical_tensors(tensors, arch, folder / WEIGHTS)
    dtype = DTYPES.get(str(cfg.get("dtype", "float32")).removeprefix("torch."))
    if dtype is None:
        raise InputError(f"load_saelens: {folder / CFG}: dtype {cfg.get('dtype')!r} is not one of {sorted(DTYPES)}")
    sae = SparseAutoencoder(int(cfg["d_in"]), int(cfg["d_sae"]), arch, k,
                            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                            normalize_activations=cfg.get("normalize_activations") or "none", dtype=dtype)
    expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    if set(tensors) != set(expected):
        raise InputError(f"load_saelens: {folder / WEIGHTS} holds {sorted(tensors)}; a {arch} SAE has "
                         f"{sorted(expected)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise InputError(f"load_saelens: {folder / WEIGHTS}: {name} is {tuple(tensors[name].shape)}, but "
                             f"cfg.json's d_in={sae.d_in}, d_sae={sae.d_sae} make it {shape}")
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(tensors[name].to(dtype))
    return sae.to(device), meta


def _read_config(cfg: dict, path: Path) -> tuple[str, int | None, dict[str, Any]]:
    """(architecture, k, metadata) of a 5.x or 6.x cfg.json; what is not supported refused by name."""
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise InputError(f"load_saelens: {path}: {key} must be an int, got {cfg.get(key)!r}")
    meta = dict(cfg.get("metadata") or {})
    version = str(cfg.get("sae_lens_version") or meta.get("sae_lens_version") or "")
    if not version or int(version.split(".")[0] or 0) < 6:  # 5.x: flat, model fields at the top
        meta = {key: cfg[key] for key in ("hook_name", "hook_point", "model_name", "hook_layer", "hook_head_index",
                                          "context_size", "prepend_bos", "dataset_path", "neuronpedia_id")
                if key in cfg} | meta
        if "hook_point" in meta and "hook_name" not in meta:
            meta["hook_name"] = meta.pop("hook_point")
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k")
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    if activation == "topk":  # 5.x's TopK
        arch, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k", k)
    if arch not in ARCHITECTURES:
        raise InputError(f"load_saelens: {path}: architecture {arch!r} is not supported here (supported: "
                         f"{', '.join(ARCHITECTURES)})")
    if arch == "topk" and k is None:
        raise InputError(f"load_saelens: {path}: a topk SAE needs k (SAELens would default it to 100 silently)")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (*NORMALIZATIONS, None, False):
        raise InputError(f"load_saelens: {path}: normalize_activations={norm!r} is not supported (its scale is not in "
                         f"the folder; fold it into the weights first); supported: {', '.join(NORMALIZATIONS)}")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise InputError(f"load_saelens: {path}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    return arch, k, meta


def _canonical_tensors(tensors: dict, arch: str, path: Path) -> dict:
    """SAELens's older names as today's: log_threshold -> threshold; a scaling factor of ones dropped."""
    tensors = dict(tensors)
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    scale = tensors.pop("finetuning_scaling_factor", None)
    if scale is not None and not torch.all(scale == 1):
        raise InputError(f"load_saelens: {path}: a finetuning_scaling_factor that is not all ones is not supported")
    return tensors
