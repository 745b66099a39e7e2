"""Small timm configs of every supported ViT variant, with every parameter randomised."""

from __future__ import annotations

import torch
from torch import nn

# name -> (timm architecture, overrides). Same structure as the real model, smaller widths.
SMALL = dict(embed_dim=48, depth=2, num_heads=3, num_classes=7)
VARIANTS = {
    "plain": ("vit_base_patch16_224", dict(img_size=32, patch_size=8)),
    "deit_distilled": ("deit_base_distilled_patch16_224", dict(img_size=32, patch_size=8)),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=42)),
    "clip_norm_pre": ("vit_base_patch32_clip_224", dict(img_size=32, patch_size=8)),
    "clip_quickgelu": ("vit_base_patch32_clip_quickgelu_224", dict(img_size=32, patch_size=8)),
    "gap_no_cls": ("vit_base_patch16_gap_224", dict(img_size=32, patch_size=8)),
    "avg_fc_norm": ("vit_base_patch16_224",
                    dict(img_size=32, patch_size=8, class_token=False, global_pool="avg", fc_norm=True)),
    "siglip_map": ("vit_base_patch16_siglip_224", dict(img_size=32, patch_size=8, act_layer="gelu_tanh")),
}


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values: LayerNorm / RMSNorm and layer-scale weights near 1 (so
    signals keep their size), everything else near 0; biases of norms random too."""
    gen = torch.Generator().manual_seed(seed)
    near_one = set()
    for mod_name, mod in module.named_modules():
        is_norm = isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith(("RmsNorm", "RMSNorm"))
        if is_norm and getattr(mod, "weight", None) is not None:
            near_one.add(f"{mod_name}.weight" if mod_name else "weight")
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name in near_one or name.rsplit(".", 1)[-1] in ("gamma", "gamma_1", "gamma_2", "lambda1"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.15 * noise)
    return module


def small_timm(variant: str, seed: int = 0, **overrides) -> nn.Module:
    import timm

    arch, kw = VARIANTS[variant]
    model = timm.create_model(arch, pretrained=False, **{**SMALL, **kw, **overrides})
    return randomize_(model.eval(), seed)


def images_for(model, batch: int = 2, seed: int = 1, size=None) -> torch.Tensor:
    h, w = size or model.patch_embed.img_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=gen)


def module_hooks(model: nn.Module) -> dict[str, list[str]]:
    """Every submodule that carries torch hooks, with the kinds of hooks it carries."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    found = {}
    for name, mod in model.named_modules():
        present = [k for k in kinds if getattr(mod, k, None)]
        if present:
            found[name or "<root>"] = present
    return found


def fused_flags(model: nn.Module) -> dict[str, bool]:
    """`fused_attn` of every attention module that has the switch."""
    return {name: mod.fused_attn for name, mod in model.named_modules() if hasattr(mod, "fused_attn")}
