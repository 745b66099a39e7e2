"""What timm's building blocks are in canonical terms: norms (LayerNorm or RMSNorm, their eps and
weights), MLPs (plain, SwiGLU, packed GLU; with or without a norm before fc2) and activations.
The timm adapters read their modules through these."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .base import norm_params

ACT_NAMES = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "ReLU": "relu",
             "SiLU": "silu", "Tanh": "tanh", "Mish": "mish", "Sigmoid": "sigmoid"}
RMS_CLASSES = ("RmsNorm", "RMSNorm")


def act_name(act: nn.Module) -> str:
    kind = type(act).__name__
    if kind == "GELU" and getattr(act, "approximate", "none") == "tanh":
        return "gelu_tanh"
    if kind not in ACT_NAMES:
        raise UnsupportedModelError(f"MLP activation {kind} is not supported (supported: "
                                    f"{', '.join(sorted(ACT_NAMES))})")
    return ACT_NAMES[kind]


def norm_kind(norm: nn.Module, where: str) -> str | None:
    """"layernorm" or "rmsnorm" for a norm over the last axis, None for an identity; anything
    else is refused by name."""
    if isinstance(norm, nn.Identity):
        return None
    shape = tuple(getattr(norm, "normalized_shape", ()) or ())
    if isinstance(norm, nn.LayerNorm) and len(shape) == 1:
        return "layernorm"
    if type(norm).__name__ in RMS_CLASSES and len(shape) == 1:
        return "rmsnorm"
    raise UnsupportedModelError(f"{where}: {type(norm).__name__} is not supported (LayerNorm and RMSNorm are, "
                                "with or without affine parameters)")


@dataclass
class Norms:
    """The norms of a tower, all of one kind and one eps (the hooked model has one of each)."""

    kind: str
    eps: float


def tower_norms(named: dict[str, nn.Module]) -> Norms:
    """The one kind and eps of `named` norms ({where: module}, identities ignored); a tower that
    mixes kinds or eps is refused by name."""
    kinds: dict[str, str] = {}
    eps: dict[str, float] = {}
    for where, norm in named.items():
        kind = norm_kind(norm, where)
        if kind is not None:
            kinds[where], eps[where] = kind, float(norm.eps)
    if len(set(kinds.values())) > 1:
        raise UnsupportedModelError(f"a tower mixing norm kinds ({', '.join(f'{w}: {k}' for w, k in kinds.items())}) "
                                    "is not supported")
    if len(set(eps.values())) > 1:
        raise UnsupportedModelError(f"norms with different eps ({', '.join(f'{w}: {e}' for w, e in eps.items())}) "
                                    "are not supported")
    return Norms(next(iter(kinds.values()), "layernorm"), next(iter(eps.values()), 1e-6))


# ---------------------------------------------------------------- MLPs
GATED = ("SwiGLU", "GluMlp")


def check_mlp(mlp: nn.Module, where: str) -> None:
    """Refuse, by name, an MLP that is not timm's Mlp, SwiGLU or packed GLU (GluMlp, SwiGLUPacked)."""
    kind = type(mlp).__name__
    if kind not in ("Mlp", *GATED):
        raise UnsupportedModelError(f"{where}: MLP type {kind} is not supported (Mlp, SwiGLU and GluMlp are)")
    for layer in ("fc1", "fc2", "fc1_g", "fc1_x"):
        if hasattr(mlp, layer) and not isinstance(getattr(mlp, layer), nn.Linear):
            raise UnsupportedModelError(f"{where}: an MLP with a {type(getattr(mlp, layer)).__name__} {layer} "
                                        "(a convolutional MLP) is not supported")
    act_name(mlp.act)
    norm_kind(mlp.norm, f"{where}.norm")


def mlp_width(mlp: nn.Module) -> int:
    """d_mlp: the width of the hidden activations fc2 reads."""
    return mlp.fc2.in_features


def mlp_weights(mlp: nn.Module) -> dict[str, Tensor | None]:
    """BlockWeights fields of an MLP: fc1 (the linear branch of a gated one), gate, fc2, mlp_norm.
    A packed GLU's fc1 holds both branches: the linear one first and the gate second when
    `gate_last` (GluMlp), the other way round when not (SwiGLUPacked)."""
    kind = type(mlp).__name__
    out = dict(fc2_w=mlp.fc2.weight, fc2_b=mlp.fc2.bias, mlp_norm=norm_params(mlp.norm), gate_w=None, gate_b=None)
    if kind == "Mlp":
        out.update(fc1_w=mlp.fc1.weight, fc1_b=mlp.fc1.bias)
    elif kind == "SwiGLU":
        out.update(fc1_w=mlp.fc1_x.weight, fc1_b=mlp.fc1_x.bias, gate_w=mlp.fc1_g.weight, gate_b=mlp.fc1_g.bias)
    else:  # GluMlp: x1, x2 = fc1(x).chunk(2); x1 * act(x2) if gate_last else act(x1) * x2
        w = mlp.fc1.weight.chunk(2, dim=0)
        b = mlp.fc1.bias.chunk(2, dim=0) if mlp.fc1.bias is not None else (None, None)
        lin, gate = (0, 1) if mlp.gate_last else (1, 0)
        out.update(fc1_w=w[lin], fc1_b=b[lin], gate_w=w[gate], gate_b=b[gate])
    return out
