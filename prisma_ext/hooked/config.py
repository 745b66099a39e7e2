"""Configuration of a HookedViT: the architecture, its token layout and the weight processing.

The field names TransformerLens's `ActivationCache` reads (`n_layers`, `n_heads`, `d_model`,
`d_mlp`, `attn_only`, `normalization_type`, `final_rms`, `device`) keep their TL meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from ..layout import TokenLayout

NormType = Literal["layernorm", "rmsnorm"]
ActFn = Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "tanh", "mish", "sigmoid"]
Pool = Literal["token", "avg", "map"]
FinalNorm = Literal["tokens", "pooled", "none"]
HeadType = Literal["linear", "module"]


@dataclass(kw_only=True)
class TowerConfig:
    """What every transformer tower shares: widths, norms, activation, weight processing.

    The field names TransformerLens's `ActivationCache` reads keep their TL meaning.
    """

    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    act_fn: ActFn = "gelu"
    eps: float = 1e-6
    eps_final: float = 1e-6
    final_norm: FinalNorm = "tokens"
    d_proj: int = 0  # width of a projection after pooling (CLIP's joint space); 0: none
    attn_scale: float | None = None  # what attention scores are multiplied by; None: d_head ** -0.5
    norm_type: NormType = "layernorm"  # every norm of the tower: "layernorm" or "rmsnorm"
    qk_norm: bool = False  # a norm on each head's queries and keys
    attn_norm: bool = False  # a norm on the heads' concatenated outputs, before the output projection
    gated_mlp: bool = False  # act(gate(x)) * fc1(x), then fc2 (SwiGLU, GLU)
    mlp_norm: bool = False  # a norm on the MLP's hidden activations, before fc2
    # weight processing (TransformerLens's options)
    fold_ln: bool = False
    center_writing_weights: bool = False
    fold_value_biases: bool = False
    use_attn_result: bool = False
    source: str = ""
    # TransformerLens compatibility
    attn_only: bool = False
    final_rms: bool = False
    positional_embedding_type: str = "standard"
    device: torch.device | str = field(default="cpu")
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.norm_type not in ("layernorm", "rmsnorm"):
            from ..errors import PrismaError

            raise PrismaError(f"norm_type must be 'layernorm' or 'rmsnorm', got {self.norm_type!r}")
        self.final_rms = self.norm_type == "rmsnorm"  # TL's flag for an RMS final norm

    @property
    def normalization_type(self) -> str:
        """TL's name for the block norms: LN / RMS, LNPre / RMSPre once their weights are folded away."""
        kind = "RMS" if self.norm_type == "rmsnorm" else "LN"
        return f"{kind}Pre" if self.fold_ln else kind

    def replace(self, **changes):
        return replace(self, **changes)


@dataclass(kw_only=True)
class ViTConfig(TowerConfig):
    """Everything needed to build a HookedViT (weights come separately, see `ViTWeights`).

    `pos_embed_on_prefix`: the position embedding has rows for the prefix tokens too (timm's
    default); False when only patches get positions (timm's `no_embed_class`, DINOv2 registers).
    `final_norm`: "tokens" normalises every token before pooling (timm's `norm`), "pooled"
    normalises the pooled vector (timm's `fc_norm`, CLIP's `ln_post` after pooling), "none" has
    no final norm. `d_proj`: CLIP's image projection; the classifier head (`n_classes`) reads its
    output when both exist. `head_type`: "linear" (an nn.Linear, `ViTWeights.head_w/head_b`) or
    "module" (any module after pooling, `ViTWeights.head_module`, e.g. Linear-GELU-Linear; the
    methods that need a linear readout, such as DLA, then refuse). `mean`/`std`: one value, or
    one per input channel.
    """

    patch_norm: bool = False  # a norm on the patch tokens, inside the patch embedding (AIMv2)
    # rotary position embeddings on the patch tokens' queries and keys (hooked/rotary.py): the
    # pair layout, and how many angle tables there are per layer (1 or n_layers) and per head (1 or n_heads)
    rotary: Literal["none", "interleaved", "half"] = "none"
    rotary_tables: int = 1
    rotary_heads: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("mean", "std"):
            values = tuple(getattr(self, name))
            if len(values) == 1:
                values = values * self.in_chans
            if len(values) != self.in_chans:
                from ..errors import PrismaError

                raise PrismaError(f"ViTConfig: {name} has {len(values)} values for {self.in_chans} input channels "
                                  "(give one per channel, or one for all)")
            setattr(self, name, values)
        if self.head_type not in ("linear", "module"):
            from ..errors import PrismaError

            raise PrismaError(f"ViTConfig: head_type must be 'linear' or 'module', got {self.head_type!r}")
        if self.rotary not in ("none", "interleaved", "half") or self.rotary_tables not in (1, self.n_layers) \
                or self.rotary_heads not in (1, self.n_heads):
            from ..errors import PrismaError

            raise PrismaError(f"ViTConfig: rotary must be 'none', 'interleaved' or 'half' (got {self.rotary!r}), "
                              f"with 1 or n_layers tables (got {self.rotary_tables}) and 1 or n_heads heads "
                              f"(got {self.rotary_heads})")

    n_classes: int = 0
    head_type: HeadType = "linear"
    img_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    in_chans: int = 3
    eps_pre: float = 1e-6
    n_cls: int = 1
    n_dist: int = 0
    n_reg: int = 0
    has_pos_embed: bool = True
    pos_embed_on_prefix: bool = True
    pos_embed_grid: tuple[int, int] | None = None
    dynamic_img_size: bool = False
    ln_pre: bool = False
    global_pool: Pool = "token"
    pool_include_prefix: bool = False
    attn_pool_heads: int = 0
    attn_pool_latent_len: int = 1
    attn_pool_d_mlp: int = 0  # 0: same as d_mlp
    attn_pool_act: str = ""  # the attention pool's MLP activation; "": same as act_fn
    # how the model wants its images
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    crop_pct: float = 1.0

    @property
    def layout(self) -> TokenLayout:
        grid = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        return TokenLayout(self.n_cls, self.n_dist, self.n_reg, grid, self.patch_size, self.img_size)

    @property
    def n_prefix(self) -> int:
        return self.n_cls + self.n_dist + self.n_reg

    @property
    def folds_final_norm(self) -> bool:
        """Whether `fold_ln` folds the final norm into what reads it linearly (the attention pool's
        keys and values when it reads normalised tokens, else the projection or the head); a final
        norm that nothing linear reads (no head, no projection) keeps its weights."""
        if not self.fold_ln or self.final_norm == "none":
            return False
        if self.global_pool == "map" and self.final_norm == "tokens":
            return True
        return bool(self.d_proj or (self.n_classes and self.head_type == "linear"))


TextPool = Literal["argmax", "eos", "last", "first", "mean", "max"]
HOOKED_TEXT_POOLS = ("argmax", "eos", "last", "first")  # what HookedTextTransformer pools by


@dataclass(kw_only=True)
class TextConfig(TowerConfig):
    """A CLIP text tower: token and position embeddings, (causal) blocks, final norm on every
    token, pooling at one position, projection. `pool`: "argmax" takes the highest token id
    (OpenAI CLIP's end-of-text), "eos" the first `eos_id`, "last"/"first" a fixed position;
    "mean"/"max" over the unpadded tokens (Hugging Face text encoders, traced only)."""

    vocab_size: int = 49408
    context_length: int = 77
    causal: bool = True
    pool: TextPool = "argmax"
    eos_id: int = 49407
