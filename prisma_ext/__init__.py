"""prisma-ext: mechanistic interpretability for vision transformers and CLIP, on TransformerLens
and nnsight.

    import prisma_ext as px
    model = px.load("builtin:shapes-vit")                  # or "timm:...", backend="nnsight"
    dla = px.direct_logit_attribution(model, images, px.LogitDiff("circle", "square"))

Every name below loads on first use (heavy libraries such as timm, transformer_lens, nnsight and
captum too), so `import prisma_ext` is fast; `dir(px)` lists them all. docs/architecture.md
says where each lives.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# public name -> (module, attribute); attribute None: the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    # loading and models
    "load": ("prisma_ext.loading", "load"),
    "HookedViT": ("prisma_ext.hooked.vit", "HookedViT"),
    "HookedCLIP": ("prisma_ext.hooked.clip", "HookedCLIP"),
    "HookedTextTransformer": ("prisma_ext.hooked.text", "HookedTextTransformer"),
    "TracedViT": ("prisma_ext.traced.model", "TracedViT"),
    "TracedCLIP": ("prisma_ext.traced.clip", "TracedCLIP"),
    "ViTConfig": ("prisma_ext.hooked.config", "ViTConfig"),
    "TextConfig": ("prisma_ext.hooked.config", "TextConfig"),
    "ViTWeights": ("prisma_ext.hooked.weights", "ViTWeights"),
    "BlockWeights": ("prisma_ext.hooked.weights", "BlockWeights"),
    "TextWeights": ("prisma_ext.hooked.weights", "TextWeights"),
    "TokenLayout": ("prisma_ext.layout", "TokenLayout"),
    "Adapter": ("prisma_ext.adapters", "Adapter"),
    "CLIPAdapter": ("prisma_ext.adapters", "CLIPAdapter"),
    "register_adapter": ("prisma_ext.adapters", "register_adapter"),
    "register_source": ("prisma_ext.sources", "register_source"),
    # what a method explains
    "ClassTarget": ("prisma_ext.analysis.targets", "ClassTarget"),
    "ClassProb": ("prisma_ext.analysis.targets", "ClassProb"),
    "LogitDiff": ("prisma_ext.analysis.targets", "LogitDiff"),
    "ImageTextScore": ("prisma_ext.analysis.targets", "ImageTextScore"),
    "FunctionTarget": ("prisma_ext.analysis.targets", "FunctionTarget"),
    # methods
    "logit_lens": ("prisma_ext.analysis.lens", "logit_lens"),
    "direct_logit_attribution": ("prisma_ext.analysis.attribution", "direct_logit_attribution"),
    "attention_rollout": ("prisma_ext.analysis.attention", "attention_rollout"),
    "gradient_attention": ("prisma_ext.analysis.attention", "gradient_attention"),
    "captum_attribution": ("prisma_ext.analysis.captum_attr", "captum_attribution"),
    "faithfulness": ("prisma_ext.analysis.faithfulness", "faithfulness"),
    "compare_attributions": ("prisma_ext.analysis.compare", "compare_attributions"),
    "activation_patching": ("prisma_ext.analysis.patching", "activation_patching"),
    "attribution_patching": ("prisma_ext.analysis.patching", "attribution_patching"),
    "image_text_patching": ("prisma_ext.analysis.patching", "image_text_patching"),
    "head_patterns": ("prisma_ext.analysis.heads", "head_patterns"),
    "head_statistics": ("prisma_ext.analysis.heads", "head_statistics"),
    "readout_attention": ("prisma_ext.analysis.heads", "readout_attention"),
    "clip_decomposition": ("prisma_ext.analysis.clip_decomposition", "clip_decomposition"),
    "text_span": ("prisma_ext.analysis.text_span", "text_span"),
    "head_ablation": ("prisma_ext.analysis.head_ablation", "head_ablation"),
    "zero_shot_segmentation": ("prisma_ext.analysis.segmentation", "zero_shot_segmentation"),
    "segmentation_scores": ("prisma_ext.analysis.segmentation", "segmentation_scores"),
    "high_norm_tokens": ("prisma_ext.analysis.high_norm", "high_norm_tokens"),
    "test_time_register": ("prisma_ext.analysis.high_norm", "test_time_register"),
    "second_order_effects": ("prisma_ext.analysis.second_order", "second_order_effects"),
    "neuron_texts": ("prisma_ext.analysis.second_order", "neuron_texts"),
    "neuron_ablation": ("prisma_ext.analysis.neuron_ablation", "neuron_ablation"),
    "llava_backend": ("prisma_ext.analysis.llava_backend", "llava_backend"),
    "AnalysisResult": ("prisma_ext.analysis.result", "AnalysisResult"),
    "ResultSet": ("prisma_ext.analysis.result", "ResultSet"),
    # subpackages
    "adapters": ("prisma_ext.adapters", None),
    "analysis": ("prisma_ext.analysis", None),
    "bridge": ("prisma_ext.bridge", None),
    "data": ("prisma_ext.data", None),
    "errors": ("prisma_ext.errors", None),
    "hooked": ("prisma_ext.hooked", None),
    "metrics": ("prisma_ext.metrics", None),
    "report": ("prisma_ext.report", None),
    "sitemaps": ("prisma_ext.sitemaps", None),
    "sources": ("prisma_ext.sources", None),
    "traced": ("prisma_ext.traced", None),
    "viz": ("prisma_ext.viz", None),
    "zoo": ("prisma_ext.zoo", None),
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .adapters import Adapter, CLIPAdapter, register_adapter
    from .analysis.attention import attention_rollout, gradient_attention
    from .analysis.attribution import direct_logit_attribution
    from .analysis.captum_attr import captum_attribution
    from .analysis.clip_decomposition import clip_decomposition
    from .analysis.compare import compare_attributions
    from .analysis.faithfulness import faithfulness
    from .analysis.head_ablation import head_ablation
    from .analysis.heads import head_patterns, head_statistics, readout_attention
    from .analysis.high_norm import high_norm_tokens, test_time_register
    from .analysis.lens import logit_lens
    from .analysis.llava_backend import llava_backend
    from .analysis.neuron_ablation import neuron_ablation
    from .analysis.patching import activation_patching, attribution_patching, image_text_patching
    from .analysis.result import AnalysisResult, ResultSet
    from .analysis.second_order import neuron_texts, second_order_effects
    from .analysis.segmentation import segmentation_scores, zero_shot_segmentation
    from .analysis.targets import ClassProb, ClassTarget, FunctionTarget, ImageTextScore, LogitDiff
    from .analysis.text_span import text_span
    from .hooked.clip import HookedCLIP
    from .hooked.config import TextConfig, ViTConfig
    from .hooked.text import HookedTextTransformer
    from .hooked.vit import HookedViT
    from .hooked.weights import BlockWeights, TextWeights, ViTWeights
    from .layout import TokenLayout
    from .loading import load
    from .sources import register_source
    from .traced.clip import TracedCLIP
    from .traced.model import TracedViT


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'prisma_ext' has no attribute {name!r}")
    module_path, attr = _LAZY[name]
    module = importlib.import_module(module_path)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
