"""Captum's attribution methods, run through either backend, summarised on the patch grid."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from .backend import Backend
from .common import check_batch, in_chunks, layout_for
from .result import AnalysisResult
from .targets import Target

# our name -> (Captum class, how pixel attributions become one value per patch)
METHODS = {
    "integrated_gradients": ("IntegratedGradients", "sum"),
    "saliency": ("Saliency", "sum"),
    "gradient_shap": ("GradientShap", "sum"),
    "noise_tunnel": ("NoiseTunnel(IntegratedGradients)", "sum"),
    "feature_ablation": ("FeatureAblation", "mean"),
    "occlusion": ("Occlusion", "mean"),
    "layer_gradcam": ("LayerGradCam", "grid"),
}


def canonical_method(name: str) -> str:
    """Our method name from ours or Captum's class name ("IntegratedGradients", "integrated_gradients")."""
    key = name.lower().replace("_", "").replace("-", "")
    for ours, (theirs, _) in METHODS.items():
        if key in (ours.replace("_", ""), theirs.lower().replace("(", "").replace(")", "")):
            return ours
    aliases = {"ig": "integrated_gradients", "gradcam": "layer_gradcam", "smoothgrad": "noise_tunnel",
               "noisetunnel": "noise_tunnel"}
    if key in aliases:
        return aliases[key]
    from ..errors import suggest

    raise InputError(suggest(name, METHODS, "Captum method") + f"; methods: {', '.join(METHODS)}")


def to_patches(attr: Tensor, patch_size: tuple[int, int], how: str) -> Tensor:
    """Pixel attributions [batch, C, H, W] -> one value per patch [batch, rows * cols]: the sum
    over the patch's pixels and channels (gradient methods: the patch's share of the score) or
    their mean (ablation and occlusion, where every pixel carries its patch's effect)."""
    ph, pw = patch_size
    b, c, h, w = attr.shape
    rows, cols = h // ph, w // pw
    blocks = attr[..., : rows * ph, : cols * pw].reshape(b, c, rows, ph, cols, pw)
    reduced = blocks.sum((1, 3, 5)) if how == "sum" else blocks.mean((1, 3, 5))
    return reduced.reshape(b, rows * cols)


def patch_feature_mask(layout, channels: int, device: Any = None, block: int = 1) -> Tensor:
    """Captum feature mask [1, C, H, W]: every pixel labelled with its patch's index, or with its
    `block` x `block` block of patches' index (one ablation per block)."""
    rows, cols = layout.grid
    ph, pw = layout.patch_size
    r, c = torch.arange(rows, device=device) // block, torch.arange(cols, device=device) // block
    ids = r[:, None] * -(-cols // block) + c[None, :]
    mask = ids.repeat_interleave(ph, 0).repeat_interleave(pw, 1)
    return mask.expand(1, channels, -1, -1).contiguous()


def default_internal_batch(n_examples: int) -> int:
    """Captum's `internal_batch_size` when none is given: at least the examples Captum expands
    the batch to, and at least 64 steps' worth per forward pass."""
    return max(64, n_examples)


class _GridProbe(nn.Module):
    """An identity module LayerGradCam hooks: the patch tokens as a [batch, d, rows, cols] map."""

    def forward(self, grid: Tensor) -> Tensor:
        return grid


def _grid_edit(probe: _GridProbe, layout) -> Callable[[Tensor], Tensor]:
    n_prefix, (rows, cols) = layout.n_prefix, layout.grid

    def edit(tokens: Tensor) -> Tensor:
        patches = tokens[:, n_prefix:]
        grid = probe(patches.transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols))
        return torch.cat([tokens[:, :n_prefix], grid.flatten(2).transpose(1, 2)], dim=1)

    return edit


def _run_captum(method: str, backend: Backend, images: Tensor, target: Target, layout, opts: dict[str, Any]
                ) -> tuple[Tensor, Tensor | None]:
    """Captum's attributions (pixel level, or [batch, 1, rows, cols] for LayerGradCam) and the
    convergence delta where the method has one."""
    import captum.attr as ca

    columns = target.columns.tolist()
    forward = backend.score_table(target)
    batch_size = opts.pop("internal_batch_size", None)  # Captum wants >= the examples it sees
    n_examples = images.shape[0] * (opts.get("nt_samples", 8) if method == "noise_tunnel" else 1)
    batch_size = batch_size or default_internal_batch(n_examples)
    per_eval = opts.pop("perturbations_per_eval", 16)
    zeros = torch.zeros_like(images)
    delta = None
    if method == "integrated_gradients":
        kw = dict(baselines=zeros, n_steps=50, internal_batch_size=batch_size, return_convergence_delta=True) | opts
        out = ca.IntegratedGradients(forward).attribute(images, target=columns, **kw)
        attr, delta = out if kw["return_convergence_delta"] else (out, None)
    elif method == "saliency":
        attr = ca.Saliency(forward).attribute(images, target=columns, **opts)
    elif method == "gradient_shap":
        kw = dict(baselines=zeros[:1], n_samples=16, stdevs=0.1) | opts
        attr = ca.GradientShap(forward).attribute(images, target=columns, **kw)
    elif method == "noise_tunnel":
        kw = dict(nt_type="smoothgrad", nt_samples=8, stdevs=0.1, baselines=zeros, n_steps=16,
                  internal_batch_size=batch_size) | opts
        attr = ca.NoiseTunnel(ca.IntegratedGradients(forward)).attribute(images, target=columns, **kw)
    elif method == "feature_ablation":
        kw = dict(baselines=0.0, feature_mask=patch_feature_mask(layout, images.shape[1], images.device),
                  perturbations_per_eval=per_eval) | opts
        with torch.no_grad():
            attr = ca.FeatureAblation(forward).attribute(images, target=columns, **kw)
    elif method == "occlusion":
        window = (images.shape[1], *layout.patch_size)
        kw = dict(sliding_window_shapes=window, strides=window, baselines=0.0,
                  perturbations_per_eval=per_eval) | opts
        with torch.no_grad():
            attr = ca.Occlusion(forward).attribute(images, target=columns, **kw)
    else:  # layer_gradcam
        layer = opts.pop("layer", backend.cfg.n_layers - 1)
        if not 0 <= layer < backend.cfg.n_layers:
            raise InputError(f"layer_gradcam: layer must be in [0, {backend.cfg.n_layers}), got {layer}")
        probe = _GridProbe()
        site = f"blocks.{layer}.ln1.hook_normalized"
        forward = backend.score_table(target, edit={site: _grid_edit(probe, layout)})
        kw = dict(relu_attributions=True) | opts
        attr = ca.LayerGradCam(forward, probe).attribute(images, target=columns, **kw)
    return attr, delta


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch and numpy (Captum's GradientShap draws from both), restoring both after."""
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            np.random.seed(seed)
            yield
    finally:
        np.random.set_state(state)


def captum_attribution(model: Any, images: Tensor, target: Any = None, *, method: str = "integrated_gradients",
                       seed: int = 0, batch_size: int | None = None, progress: bool = False,
                       **options: Any) -> AnalysisResult:
    """One of Captum's attribution methods, as a map on the patch grid [batch, patch].

    method (ours or Captum's class name): "integrated_gradients" (zero baseline, n_steps=50),
    "saliency" (absolute gradients), "gradient_shap" (the zero baseline, n_samples=16 with
    stdevs=0.1 of input noise), "noise_tunnel" (SmoothGrad over IntegratedGradients: nt_samples=8,
    stdevs=0.1, n_steps=16), "feature_ablation" and "occlusion" (each patch replaced by 0, one
    feature / window per patch), "layer_gradcam" (Grad-CAM with its ReLU on the normalised input
    of block `layer`'s attention, `blocks.{layer}.ln1.hook_normalized`, default the last block,
    its patch tokens reshaped to [batch, d_model, rows, cols]; the last block's output would
    give a CLS model's patches no gradient, and the un-normalised residual stream's shared
    component across patches sets the sign of the map). `options` go to Captum's `attribute`
    (e.g. n_steps, baselines, internal_batch_size (default: max(64, the examples Captum
    expands the batch to)), perturbations_per_eval (default 16), relu_attributions).
    Gradient methods sum pixel attributions over each patch; ablation and occlusion give each
    patch's effect. The target is wrapped into the forward function as a table of scores and
    passed to Captum as `target=` (a class, one per image, `LogitDiff`, `ImageTextScore`, or a
    function of the output). Random methods are seeded by `seed` (global RNG state kept).
    `meta["delta"]`: IntegratedGradients' convergence delta [batch]; `meta["seconds"]`.
    `batch_size`: images per Captum call (default all); Captum's own `internal_batch_size` and
    `perturbations_per_eval` are options.
    """
    check_batch(images, "captum_attribution")
    method = canonical_method(method)
    for key in ("n_steps", "n_samples", "nt_samples"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"captum_attribution: {key} must be a positive int, got {value!r}")
    backend = Backend.of(model)
    backend.require_local("captum_attribution", "Captum differentiates the forward pass with torch autograd, and a "
                          "remote trace returns values, not their graph (gradient_attention and "
                          "attribution_patching take gradients inside the trace)")
    return in_chunks(backend, images, target, batch_size, progress, "captum_attribution",
                     lambda x, bound: _attribute(backend, x, bound, method, seed, options))


def _attribute(backend: Backend, images: Tensor, target: Target, method: str, seed: int, options: dict
               ) -> AnalysisResult:
    layout = layout_for(backend, images)
    start = time.perf_counter()
    inputs = images.detach().clone()
    if method not in ("feature_ablation", "occlusion"):
        inputs.requires_grad_(True)  # ours, not the caller's tensor (Captum would flip its flag)
    with _seeded(seed, images.device):
        attr, delta = _run_captum(method, backend, inputs, target, layout, dict(options))
    how = METHODS[method][1]
    values = attr.detach().reshape(images.shape[0], -1) if how == "grid" else to_patches(attr.detach(),
                                                                                        layout.patch_size, how)
    meta = {"captum": METHODS[method][0], "target": target.describe(), "options": options,
            "seconds": time.perf_counter() - start, "backend": backend.kind}
    if delta is not None:
        meta["delta"] = delta.detach()
    return AnalysisResult(f"captum/{method}", values, ("batch", "patch"), layout, backend.class_names, {}, meta)
