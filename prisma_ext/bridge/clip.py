"""TransformerBridge architecture adapters for Hugging Face CLIP.

`CLIPVisionModel` / `CLIPVisionModelWithProjection` map onto TransformerLens' top-level names
(`embed`, `ln_pre`, `blocks`, `ln_final`, plus `visual_proj`), like TL's own ViT adapter.
`CLIPModel` has two towers, so each tower is one component holding the same names:
`visual.{embed,ln_pre,blocks,ln_final}` and `text.{embed,pos_embed,blocks,ln_final}`, with
`visual_proj` / `text_proj` at the top. The bridge runs HF's own forward; these components only
wrap HF's submodules, so outputs are HF's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
from transformer_lens.model_bridge.generalized_components import (
    AttentionBridge,
    BlockBridge,
    EmbeddingBridge,
    LinearBridge,
    MLPBridge,
    NormalizationBridge,
    PosEmbedBridge,
)
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.generalized_components.vision_encoder import (
    vision_attention_config,
)

Mapping = dict[str, GeneralizedComponent]


def _norm(name: str, cfg: Any) -> NormalizationBridge:
    # Native autograd runs HF's LayerNorm itself, so each tower's own eps applies.
    return NormalizationBridge(name=name, config=cfg, use_native_layernorm_autograd=True)


class CLIPAttentionBridge(AttentionBridge):
    """`CLIPAttention` whose `hook_attn_scores` / `hook_pattern` are live.

    TL's `AttentionBridge` lets HF compute attention and fires the pattern hook afterwards on
    what HF returns: never under SDPA (HF returns no weights), read-only under eager. Here, while
    `hook_attn_scores` or `hook_pattern` has a hook attached (or `hook_result`, once
    `use_attn_result` is on), attention is computed explicitly from the wrapped q/k/v/o
    projections (eager's arithmetic, softmax in float32), so the scores are pre-softmax and an
    edited pattern or per-head result changes the output. With none of them hooked, HF's own
    kernel (SDPA, eager, ...) runs untouched.
    """

    supports_attn_result = True

    def _result_on(self) -> bool:
        return bool(getattr(self.config, "use_attn_result", False)) and self.hook_result.has_hooks()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hooked = (
            self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks() or self._result_on()
        )
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if not hooked or not isinstance(hidden, torch.Tensor):
            return super().forward(*args, **kwargs)
        if mask is not None and not isinstance(mask, torch.Tensor):
            return super().forward(*args, **kwargs)  # e.g. a flex-attention BlockMask
        module = self.original_component
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
        return self._explicit(self.hook_in(hidden), mask, causal and mask is None)

    def _explicit(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        module = self.original_component
        batch, n_pos, _ = hidden.shape
        heads, d_head = module.num_heads, module.head_dim

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, n_pos, heads, d_head).transpose(1, 2)

        q, k, v = split(self.q(hidden)), split(self.k(hidden)), split(self.v(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) * module.scale
        lowest = torch.finfo(scores.dtype).min
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, lowest)  # SDPA-style mask: True attends
        elif mask is not None:
            scores = scores + mask  # eager-style additive mask
        elif causal:
            future = torch.ones(n_pos, n_pos, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, lowest)
        scores = self.hook_attn_scores(scores)
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        pattern = nn.functional.dropout(pattern, p=module.dropout, training=module.training)
        pattern = self.hook_pattern(pattern)
        z = torch.matmul(pattern, v).transpose(1, 2).reshape(batch, n_pos, heads * d_head)
        out = self._per_head_out(z, heads, d_head) if self._result_on() else self.o(z)
        return self.hook_out(out), pattern

    def _per_head_out(self, z: torch.Tensor, heads: int, d_head: int) -> torch.Tensor:
        """Output projection split by head: fires `hook_result` [batch, pos, head, d_model]."""
        z = self.o.hook_in(z)
        proj = self.o.original_component
        w_o = proj.weight.view(proj.out_features, heads, d_head)
        result = torch.einsum("bphd,mhd->bphm", z.view(*z.shape[:2], heads, d_head), w_o)
        out = self.hook_result(result).sum(dim=-2)
        if proj.bias is not None:
            out = out + proj.bias
        return self.o.hook_out(out)


class CLIPBlockBridge(BlockBridge):
    """`CLIPEncoderLayer` with a real `hook_resid_mid`.

    TL's `BlockBridge` aliases `hook_resid_mid` to `ln2.hook_in`; HF's layer keeps its own copy
    of the mid residual for the skip connection, so an edit there reaches only the MLP. While
    `hook_resid_mid` is hooked, this block composes the layer from its bridged parts (the same
    arithmetic as HF's) so the edit flows into both the MLP and the residual stream. Otherwise
    HF's layer runs itself.
    """

    def __init__(self, name: str, submodules: Mapping) -> None:
        super().__init__(name, submodules=submodules)
        self.hook_aliases = {k: v for k, v in self.hook_aliases.items() if k != "hook_resid_mid"}
        self.hook_resid_mid = HookPoint()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.hook_resid_mid.has_hooks():
            return super().forward(*args, **kwargs)
        # BlockBridge.forward's bookkeeping (capture hooks, start/stop_at_layer, hook_in).
        self._maybe_wire_capture_hooks()
        self._clear_attention_capture()
        args, kwargs = self._maybe_inject_start_residual(args, kwargs)
        self._check_stop_at_layer(*args, **kwargs)
        args, kwargs = self._hook_input_hidden_states(args, kwargs)
        standalone = self._is_standalone_hidden_state_call(args, kwargs)
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        mask = args[1] if len(args) > 1 else kwargs.pop("attention_mask", None)
        try:
            attn_out = self.attn(hidden_states=self.ln1(hidden), attention_mask=mask, **kwargs)[0]
            mid = self.hook_resid_mid(hidden + attn_out)
            out = mid + self.mlp(self.ln2(mid))
        finally:
            self._clear_attention_capture()
        return self._apply_output_hook(out, force_tuple_for_bare_tensor=standalone)


def _blocks(path: str, cfg: Any, attn_cfg: Any, causal: bool) -> BlockBridge:
    """`CLIPEncoderLayer` list: pre-LN attention then pre-LN MLP (fc1 -> act -> fc2)."""
    attn = CLIPAttentionBridge(
        name="self_attn",
        config=attn_cfg,
        is_causal=causal,
        submodules={
            "q": LinearBridge(name="q_proj"),
            "k": LinearBridge(name="k_proj"),
            "v": LinearBridge(name="v_proj"),
            "o": LinearBridge(name="out_proj"),
        },
    )
    mlp = MLPBridge(
        name="mlp",
        config=cfg,
        submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")},
    )
    return CLIPBlockBridge(
        name=path,
        submodules={
            "ln1": _norm("layer_norm1", cfg),
            "attn": attn,
            "ln2": _norm("layer_norm2", cfg),
            "mlp": mlp,
        },
    )


def vision_components(prefix: str, cfg: Any, attn_cfg: Any) -> Mapping:
    """Vision tower at `prefix`: embeddings (patch conv + CLS + positions) -> ln_pre -> blocks.

    `ln_final` is HF's `post_layernorm`, which acts on the pooled CLS token only, so its hooks
    are `[batch, d_model]`, not `[batch, pos, d_model]`.
    """
    return {
        "embed": GeneralizedComponent(name=f"{prefix}embeddings"),
        "ln_pre": _norm(f"{prefix}pre_layrnorm", cfg),
        "blocks": _blocks(f"{prefix}encoder.layers", cfg, attn_cfg, causal=False),
        "ln_final": _norm(f"{prefix}post_layernorm", cfg),
    }


def text_components(prefix: str, cfg: Any, attn_cfg: Any) -> Mapping:
    """Causal text tower at `prefix`: token + position embeddings -> blocks -> final LN (all
    tokens). Pooling (the EOS position, see `eos_positions`) happens in HF's forward."""
    return {
        "embed": EmbeddingBridge(name=f"{prefix}embeddings.token_embedding"),
        "pos_embed": PosEmbedBridge(name=f"{prefix}embeddings.position_embedding"),
        "blocks": _blocks(f"{prefix}encoder.layers", cfg, attn_cfg, causal=True),
        "ln_final": _norm(f"{prefix}final_layer_norm", cfg),
    }


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The position HF's CLIP text tower pools, per sequence.

    Old configs say `eos_token_id == 2` and pool the largest id (the end-of-text token is the
    highest id in CLIP's vocabulary); newer ones pool the first `eos_token_id`.
    """
    ids = input_ids.to(torch.int)
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


def set_use_attn_result(bridge: Any, enabled: bool = True) -> None:
    """Turn `attn.hook_result` ([batch, pos, head, d_model]) on or off in every block.

    Same as TL's `bridge.set_use_attn_result`, which only reaches a top-level `blocks` and so
    refuses `CLIPModel`; this also reaches the `visual.` and `text.` towers.
    """
    bridge.cfg._set_bridge_managed_hook_flag("use_attn_result", enabled)
    for module in bridge.modules():
        if isinstance(module, CLIPAttentionBridge):
            object.__setattr__(module.config, "use_attn_result", enabled)


class CLIPTowerBridge(GeneralizedComponent):
    """One CLIP tower (`CLIPVisionModel` or `CLIPTextModel`) inside `CLIPModel`.

    `hook_in` sees the tower's input (pixels or token ids); `hook_out` is the tower's pooled
    output (after the final LayerNorm, before the projection), and an edit there reaches the
    projection and the logits.
    """

    hook_aliases = {"hook_embed": "embed.hook_out"}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tower = self.original_component
        if tower is None:
            raise RuntimeError(f"Original component not set for {self.name}.")
        for key in ("pixel_values", "input_ids"):
            if key in kwargs:
                kwargs[key] = self.hook_in(kwargs[key])
                break
        else:
            if args:
                args = (self.hook_in(args[0]), *args[1:])
        output = tower(*args, **kwargs)
        if isinstance(output, tuple):  # return_dict=False: (last_hidden_state, pooled, ...)
            return (output[0], self.hook_out(output[1]), *output[2:])
        output.pooler_output = self.hook_out(output.pooler_output)
        return output


class _CLIPAdapterBase(ArchitectureAdapter):
    """Shared flags: pre-LN encoder blocks, learned absolute positions, no LM head."""

    supports_generation = False
    supports_causal_loss = False
    applicable_phases = [1]

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.normalization_type = "LN"
        self.cfg.positional_embedding_type = "standard"
        self.cfg.final_rms = False
        self.cfg.gated_mlp = False
        self.cfg.attn_only = False

    def setup_hook_compatibility(self, bridge: Any) -> None:
        """Split q/k/v/z hooks into heads in every block, towers included.

        The bridge only does this for its top-level `blocks`; `CLIPModel` has none.
        """
        for module in bridge.modules():
            if isinstance(module, CLIPAttentionBridge):
                module.setup_hook_compatibility()


class CLIPVisionArchitectureAdapter(_CLIPAdapterBase):
    """HF `CLIPVisionModel` and `CLIPVisionModelWithProjection` (`visual_proj` added)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.is_visual_model = True
        with_proj = getattr(cfg, "architecture", None) == "CLIPVisionModelWithProjection"
        self.component_mapping = self._mapping(with_proj)

    def _mapping(self, with_proj: bool) -> Mapping:
        prefix = "vision_model." if with_proj else ""
        mapping = vision_components(prefix, self.cfg, self.cfg)
        if with_proj:
            mapping["visual_proj"] = LinearBridge(name="visual_projection")
        return mapping

    def prepare_model(self, hf_model: Any) -> None:
        """Choose the mapping from the module itself, whatever name it was registered under."""
        super().prepare_model(hf_model)
        self.component_mapping = self._mapping(hasattr(hf_model, "visual_projection"))


class CLIPArchitectureAdapter(_CLIPAdapterBase):
    """HF `CLIPModel`: `visual.*` and `text.*` towers plus `visual_proj` / `text_proj`.

    The bridge config describes the text tower (TL reads `text_config` first); the vision
    tower's attention hooks get the vision head count from `cfg.vision_config`.
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.is_multimodal = True
        self._extract_vision_dims(cfg)
        vision_attn = vision_attention_config(self.cfg)
        self.component_mapping = {
            "visual": CLIPTowerBridge(
                name="vision_model", submodules=vision_components("", self.cfg, vision_attn)
            ),
            "visual_proj": LinearBridge(name="visual_projection"),
            "text": CLIPTowerBridge(
                name="text_model",
                submodules=text_components("", self.cfg, self.cfg),
                hook_alias_overrides={"hook_pos_embed": "pos_embed.hook_out"},
            ),
            "text_proj": LinearBridge(name="text_projection"),
        }


ADAPTERS: dict[str, type[ArchitectureAdapter]] = {
    "CLIPVisionModel": CLIPVisionArchitectureAdapter,
    "CLIPVisionModelWithProjection": CLIPVisionArchitectureAdapter,
    "CLIPModel": CLIPArchitectureAdapter,
}
