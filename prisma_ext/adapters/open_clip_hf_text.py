"""open_clip text towers that wrap a Hugging Face encoder (`HFTextEncoder`: RoBERTa, XLM-R, BERT,
mT5, NLLB's M2M-100): traced by the nnsight backend, refused by the TL backend with the feature
named (the hooked text tower is a pre-norm transformer with learned absolute positions and no
padding mask)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from ..hooked.config import TextConfig

# model_type -> the layer layout its site map follows (prisma_ext.sitemaps.open_clip_hf_text)
LAYOUTS = {"roberta": "bert", "xlm-roberta": "bert", "bert": "bert", "mt5": "t5", "m2m_100": "m2m100"}

# what the hooked text tower lacks, per layout (every HFTextEncoder also masks its padding tokens)
TL_MISSING = {
    "bert": "post-norm blocks (the norm after each residual branch)",
    "t5": "T5's relative position biases",
    "m2m100": "sinusoidal positions offset past the padding index",
}

POOLS = {"MeanPooler": "mean", "MaxPooler": "max", "ClsPooler": "first", "ClsLastHiddenStatePooler": "first"}

# (d_model, n_layers, n_heads, d_mlp, act, eps) attribute names of each layout's HF config
WIDTHS = {
    "bert": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
             "layer_norm_eps"),
    "t5": ("d_model", "num_layers", "num_heads", "d_ff", "dense_act_fn", "layer_norm_epsilon"),
    "m2m100": ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "activation_function",
               None),
}
ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
        "silu": "silu", "swish": "silu", "tanh": "tanh"}


def is_hf_text(model: nn.Module) -> bool:
    """Whether an open_clip model's text tower is a Hugging Face encoder."""
    return type(getattr(model, "text", None)).__name__ == "HFTextEncoder"


def layout(model: nn.Module) -> str:
    """The layer layout of the wrapped encoder ("bert", "t5", "m2m100"), or a refusal by name."""
    model_type = model.text.config.model_type
    if model_type not in LAYOUTS:
        raise UnsupportedModelError(
            f"open_clip text tower HFTextEncoder over a Hugging Face {model_type!r} encoder is not supported; "
            f"supported encoders: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[model_type]


def check_hf_text(model: nn.Module) -> None:
    """The nnsight backend's check: an encoder whose layers its site map knows, a known pooler."""
    layout(model)
    pooler = type(model.text.pooler).__name__
    if pooler not in POOLS:
        raise UnsupportedModelError(f"open_clip text tower: the {pooler} pooler is not supported; "
                                    f"supported: {', '.join(sorted(POOLS))}")


def refuse_on_tl(model: nn.Module) -> None:
    """The TL backend's refusal of a Hugging Face text tower, naming what the hooked tower lacks."""
    config = model.text.config
    missing = TL_MISSING.get(LAYOUTS.get(config.model_type, ""), f"a {config.model_type} encoder")
    raise UnsupportedModelError(
        f"open_clip text tower HFTextEncoder ({config.model_type}, {getattr(config, '_name_or_path', '') or '?'}): "
        f"{missing} and a padding mask are not supported on the TL backend; backend='nnsight' traces this "
        "model (both towers, with HookedCLIP's site names)")


def hf_text_config(model: nn.Module, context_length: int | None, source: str) -> TextConfig:
    """The text tower's `TextConfig` as the nnsight backend uses it (widths, vocabulary, context
    length, pooling); `context_length`: the tokenizer's (open_clip's config of a named model),
    else the positions the encoder has."""
    text = model.text
    config = text.config
    kind = layout(model)
    d, n, h, mlp, act, eps = (getattr(config, a, None) if a else None for a in WIDTHS[kind])
    if kind == "t5":
        d_head, norm, gated = config.d_kv, "rmsnorm", bool(getattr(config, "is_gated_act", False))
    else:
        d_head, norm, gated = d // h, "layernorm", False
    return TextConfig(
        d_model=d, n_layers=n, n_heads=h, d_head=d_head, d_mlp=mlp, act_fn=ACTS.get(act, "gelu"),
        eps=eps or 1e-5, eps_final=eps or 1e-5, norm_type=norm, gated_mlp=gated,
        d_proj=text.output_dim, vocab_size=config.vocab_size,
        context_length=min(context_length, _positions(config)) if context_length else _positions(config),
        causal=False,
        pool=POOLS[type(text.pooler).__name__], eos_id=config.eos_token_id if config.eos_token_id is not None else 2,
        source=source)


def _positions(config: Any) -> int:
    """How many tokens the encoder's position embeddings take (T5's relative ones: its 512)."""
    limit = getattr(config, "max_position_embeddings", 0) or 512
    if config.model_type in ("roberta", "xlm-roberta"):  # positions start after the padding index
        limit -= config.pad_token_id + 1
    return limit
