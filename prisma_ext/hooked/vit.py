"""HookedViT: a TransformerLens `HookedRootModule` for ViT classifiers with any token layout."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..errors import PrismaError, UnknownNameError, suggest
from ..layout import TokenLayout
from .attention_pool import AttentionPool
from .config import ViTConfig
from .embed import Embedding
from .inputs import check_images
from .layers import Block
from .load_weights import load_into
from .norms import NormSpec, make_norm
from .processing import process_weights
from .readout import Readout
from .root import CheckedHookedRoot, TowerWeightViews
from .weights import ViTWeights, detached_copy


class HookedViT(CheckedHookedRoot, TowerWeightViews):
    """A ViT classifier with TransformerLens hook points and weight views.

    Build it with `prisma_ext.load(...)` or `HookedViT.from_weights(cfg, weights)`.
    `model(images)` gives logits [batch, n_classes]; `run_with_cache` gives an `ActivationCache`.
    Sites: `hook_patch_embed` [batch, n_patches, d_model]; `hook_embed` and `hook_pos_embed`
    [batch, pos, d_model] (their sum enters the residual stream; with a pre-norm, `hook_full_embed`
    is that sum, `ln_pre` normalises it and `hook_embed` is the result, with no `hook_pos_embed`);
    per block the TL sites of `Block`; `ln_final.hook_scale/hook_normalized`; `hook_pooled`
    [batch, d_model] (the pooled token after the final norm; [batch, 2, d_model] for a distilled
    model). With a projection (CLIP), `hook_image_embed` [batch, d_proj] is its output; the
    classifier head (a trained one, or a zero-shot head from text, see `set_unembed`) reads it.
    """

    def __init__(self, cfg: ViTConfig, class_names: Sequence[str] | None = None):
        super().__init__()
        self.cfg = cfg
        self.class_names = list(class_names) if class_names is not None else None
        self.embed = Embedding(cfg)
        self.hook_patch_embed = HookPoint()
        self.hook_embed = HookPoint()
        if cfg.ln_pre:
            self.hook_full_embed = HookPoint()
            self.ln_pre = make_norm(NormSpec(cfg.norm_type, cfg.eps_pre), cfg.d_model)
        else:
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        if cfg.final_norm != "none":
            self.ln_final = make_norm(NormSpec(cfg.norm_type, cfg.eps_final, not cfg.folds_final_norm), cfg.d_model)
        if cfg.global_pool == "map":
            self.attn_pool = AttentionPool(
                cfg.d_model, cfg.attn_pool_heads, cfg.attn_pool_latent_len,
                cfg.attn_pool_d_mlp or cfg.d_mlp, cfg.attn_pool_act or cfg.act_fn, cfg.eps, has_norm=True,
                norm_type=cfg.norm_type)
        self.hook_pooled = HookPoint()
        if cfg.d_proj:
            self.proj = nn.Linear(cfg.d_model, cfg.d_proj)
            self.hook_image_embed = HookPoint()
        d_head_in = cfg.d_proj or cfg.d_model
        self.head = nn.Linear(d_head_in, cfg.n_classes) if cfg.n_classes and cfg.head_type == "linear" else None
        if cfg.n_dist and cfg.n_classes:
            self.head_dist = nn.Linear(cfg.d_model, cfg.n_classes)
        self.setup()

    @classmethod
    def from_weights(cls, cfg: ViTConfig, weights: ViTWeights,
                     class_names: Sequence[str] | None = None, meta: bool = False) -> HookedViT:
        """Process a copy of `weights` as `cfg` asks (fold_ln, ...) and build the model. `meta`:
        build its modules on the meta device and leave them there (a conversion that follows or
        assigns the values instead, `analysis.remote_weights`)."""
        weights = detached_copy(weights, dtype=cfg.dtype)
        process_weights(weights, cfg)
        if meta:
            with torch.device("meta"):
                model = cls(cfg, class_names)
            load_into(model, weights)
            return model.eval()
        model = cls(cfg, class_names)
        load_into(model, weights)
        return model.to(device=cfg.device, dtype=cfg.dtype).eval()

    # ------------------------------------------------------------------ forward
    @property
    def layout(self) -> TokenLayout:
        return self.cfg.layout

    def forward(self, images: Tensor, return_type: str | None = "logits") -> Tensor | None:
        """images [batch, channels, height, width] -> logits [batch, n_classes].

        `return_type`: "logits" (the head's output; the image embedding when there is no head),
        "embeds" (CLIP's projected image embedding [batch, d_proj]), "pooled" (the pooled token
        after the final norm), "resid" (the final residual stream [batch, pos, d_model]) or None.
        """
        if return_type not in ("logits", "embeds", "pooled", "resid", None):
            raise PrismaError(f"return_type must be 'logits', 'embeds', 'pooled', 'resid' or None, "
                              f"got {return_type!r}")
        check_images(images, self.cfg)
        grid = (images.shape[-2] // self.cfg.patch_size[0], images.shape[-1] // self.cfg.patch_size[1])
        return self.run_from(self._embed(images), 0, return_type, grid=grid)

    def run_from(self, resid: Tensor, layer: int, return_type: str | None = "logits",
                 readout_only: bool = False, grid: tuple[int, int] | None = None) -> Tensor | None:
        """Continue a forward pass from `blocks.{layer}.hook_resid_pre` = resid [batch, pos, d_model]
        (e.g. a cached residual stream, to rerun only the layers after a patch).

        readout_only: when the readout reads only the prefix tokens (CLS, distillation), the last
        block computes every token's keys and values but carries only those tokens on (about a
        quarter of a block's work); its sites from `attn_scores` on then hold only those rows,
        and `return_type="resid"` returns only them. Outputs are unchanged.
        grid: the patch grid (rows, cols) of the images, which a rotary model's angles depend on;
        by default the model's own grid, or the grid of the last images of this token count.
        """
        n_query = self.readout.query_tokens if readout_only else None
        tables = self.embed.rotary(grid or self._grid_of(resid.shape[1]))
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks[layer:], start=layer):
            rotary = None if tables is None else (tables[0][i % len(tables[0])], tables[1][i % len(tables[1])])
            resid = block(resid, n_query if i == last else None, rotary)
        if return_type == "resid":
            return resid
        pooled = self.hook_pooled(self.readout.pool(resid))
        if return_type == "pooled":
            return pooled
        if self.cfg.d_proj:
            pooled = self.hook_image_embed(self.proj(pooled))
        if return_type == "embeds" or self.head is None:
            return pooled.mean(1) if self.cfg.n_dist else pooled  # distilled, no heads: timm averages
        if return_type is None:
            return None
        if self.cfg.n_dist:
            return (self.head(pooled[:, 0]) + self.head_dist(pooled[:, 1])) / 2
        return self.head(pooled)

    @property
    def readout(self) -> Readout:
        """How the final residual stream becomes the output (pooling, final norm, head)."""
        return Readout(self)

    def readout_tokens(self) -> int | None:
        """How many leading tokens the readout reads (`readout.query_tokens`)."""
        return self.readout.query_tokens

    def _grid_of(self, n_tokens: int) -> tuple[int, int]:
        """The patch grid of a residual stream of `n_tokens` tokens: the model's own, or the grid of
        the last images embedded with that many patches (dynamic sizes)."""
        n_patches = n_tokens - self.cfg.n_prefix
        if n_patches == self.cfg.layout.n_patches or self.cfg.rotary == "none":
            return self.cfg.layout.grid
        grid = self.__dict__.get("_grids", {}).get(n_patches)
        if grid is None:
            raise PrismaError(f"run_from: {n_patches} patch tokens is not this model's grid {self.cfg.layout.grid}; "
                              "pass grid=(rows, cols) for a rotary model")
        return grid

    def _embed(self, images: Tensor) -> Tensor:
        patches, prefix, pos = self.embed(images)
        if self.cfg.rotary != "none":  # the grid a later run_from on this stream must rotate by
            grid = (images.shape[-2] // self.cfg.patch_size[0], images.shape[-1] // self.cfg.patch_size[1])
            self.__dict__.setdefault("_grids", {})[grid[0] * grid[1]] = grid
        tokens = self.hook_patch_embed(patches)
        if prefix is not None:
            tokens = torch.cat([prefix.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        batch_pos = pos.expand(tokens.shape[0], -1, -1) if pos is not None else torch.zeros_like(tokens)
        if self.cfg.ln_pre:
            return self.hook_embed(self.ln_pre(self.hook_full_embed(tokens + batch_pos)))
        return self.hook_embed(tokens) + self.hook_pos_embed(batch_pos)

    # ------------------------------------------------------------------ sites
    def site_shapes(self, batch_size: int = 1) -> dict[str, tuple[int, ...]]:
        """Every site name with its activation shape, from one forward pass on zeros."""
        x = torch.zeros(batch_size, self.cfg.in_chans, *self.cfg.img_size,
                        device=self.cfg.device, dtype=self.cfg.dtype)
        with torch.no_grad():
            _, cache = self.run_with_cache(x, return_cache_object=False)
        return {name: tuple(t.shape) for name, t in cache.items()}

    # ------------------------------------------------------------------ TL weight views
    @property
    def W_E(self) -> Tensor:
        """The patch embedding as a matrix [in_chans * ph * pw, d_model]."""
        return self.embed.proj.weight.flatten(1).T

    @property
    def W_pos(self) -> Tensor:
        return self.embed.pos_embed

    @property
    def W_U(self) -> Tensor:
        """The readout after the final norm as one unembedding [d_model, n_classes]: the head,
        composed with the image projection when there is one (final norm's weight folded in with
        `fold_ln`). For a distilled model: the class-token head (`W_U_dist` is the other)."""
        return self.readout.unembed()[0]

    @property
    def b_U(self) -> Tensor:
        return self.readout.unembed()[1]

    def set_unembed(self, weight: Tensor, class_names: Sequence[str] | None = None,
                    bias: Tensor | None = None) -> None:
        """Install a classifier head [n_classes, d_in] reading the image embedding (CLIP: the
        projected embedding, e.g. zero-shot text embeddings), replacing any head there was."""
        if self.cfg.n_dist:
            raise PrismaError("set_unembed: a distilled model averages two heads; replace both by hand")
        d_in = self.cfg.d_proj or self.cfg.d_model
        if weight.ndim != 2 or weight.shape[1] != d_in:
            raise PrismaError(f"unembedding weight must be [n_classes, {d_in}], got {tuple(weight.shape)}")
        if class_names is not None and len(class_names) != weight.shape[0]:
            raise PrismaError(f"{len(class_names)} class names for {weight.shape[0]} classes")
        head = nn.Linear(d_in, weight.shape[0]).to(device=weight.device, dtype=self.cfg.dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))
        self.head = head
        self.cfg = self.cfg.replace(n_classes=weight.shape[0])
        self.class_names = list(class_names) if class_names is not None else None

    @property
    def W_U_dist(self) -> Tensor:
        return self.head_dist.weight.T

    @property
    def b_U_dist(self) -> Tensor:
        return self.head_dist.bias

    def to_single_token(self, class_name: str | int) -> int:
        """A class index from its name (or the index itself)."""
        if isinstance(class_name, int):
            if not 0 <= class_name < self.cfg.n_classes:
                raise PrismaError(f"class index {class_name} out of range [0, {self.cfg.n_classes})")
            return class_name
        names = self.class_names or []
        if class_name in names:
            return names.index(class_name)
        raise UnknownNameError(suggest(class_name, names, "class"))

    def _final_affine(self) -> tuple[Tensor | None, Tensor | None]:
        return self.readout.affine()

    def _class_ids(self, tokens) -> Tensor:
        if isinstance(tokens, (str, int)):
            return torch.tensor(self.to_single_token(tokens))
        if isinstance(tokens, Tensor):
            return tokens.long()
        return torch.tensor([self.to_single_token(t) for t in tokens])

    def tokens_to_residual_directions(self, tokens) -> Tensor:
        """Residual directions of classes: [d_model] for one class, [..., d_model] for a tensor.

        A direction is what a centred, scale-divided final residual vector is dotted with to
        give the class logit (less its bias), i.e. `W_U[:, c]` with the final norm's weight
        multiplied in when it is not folded. TL's `logit_attrs` uses these.
        """
        self.readout.require_linear("tokens_to_residual_directions")
        ids = self._class_ids(tokens)
        self._warn_unfolded_bias(ids)
        return self.readout.pooled_directions(ids)

    def readout_bias(self, tokens) -> Tensor:
        """The constant of each class's logit in TL's decomposition: with
        `(cache.logit_attrs(stack, tokens=c)).sum(0) + model.readout_bias(c)` equal to the logit.
        It is `b_U[c]` when the final norm is folded (`fold_ln=True`, TransformerLens's
        `from_pretrained` default), else `b_U[c] + ln_final.b @ W_U[:, c]`."""
        self.readout.require_linear("readout_bias")
        return self.readout.class_directions(self._class_ids(tokens), 1)[1]

    def _warn_unfolded_bias(self, ids) -> None:
        """Once per model: TL's habit `logit_attrs(...).sum(0) + b_U[c]` misses the final norm's
        bias when it is not folded; say so (with its size) rather than let the sum come out short."""
        if self.cfg.folds_final_norm or getattr(self, "_warned_unfolded_bias", False):
            return
        with torch.no_grad():
            gap = (self.readout_bias(ids) - self.b_U[ids]).abs().max() if self.cfg.n_classes else 0.0
        if float(gap) > 1e-6:
            import warnings

            self._warned_unfolded_bias = True
            warnings.warn(f"fold_ln is off, so the final norm's bias is not in b_U: TL's logit_attrs(...).sum(0) "
                          f"+ b_U[c] misses up to {float(gap):.3g} of the logit; add model.readout_bias(c) instead "
                          "of b_U[c], or load with px.load(..., fold_ln=True) (TransformerLens's from_pretrained "
                          "default), where b_U holds it", UserWarning, stacklevel=3)

    def token_readout(self, tokens, n_tokens: int | None = None) -> tuple[Tensor, Tensor]:
        """The logit of each class as a sum over tokens, for every linear readout.

        Returns (directions [..., pos, d_model], bias [...]) such that
        `logit = sum_pos (normalised_resid[pos] . directions[pos]) + bias`, where
        normalised_resid is the final residual stream centred and divided by the final norm's
        cached scale (`cache.apply_ln_to_stack`), with that scale frozen. Covers the CLS token,
        distilled (CLS and distillation heads averaged) and average-pooled heads
        (`readout.class_directions`).
        """
        self.readout.require_linear("token_readout")
        return self.readout.class_directions(self._class_ids(tokens), n_tokens)

    # ------------------------------------------------------------------ presentation
    def summary(self) -> str:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.parameters())
        parts = [
            f"HookedViT from {cfg.source or 'weights'}: {cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.n_heads} heads x d_head {cfg.d_head}, d_mlp {cfg.d_mlp}, act {cfg.act_fn}, "
            f"{n_params / 1e6:.2f}M parameters",
            f"norms: {'RMSNorm' if cfg.norm_type == 'rmsnorm' else 'LayerNorm'} eps {cfg.eps}"
            f"{', ln_pre' if cfg.ln_pre else ''}{', qk-norm' if cfg.qk_norm else ''}"
            f"{f', rotary ({cfg.rotary})' if cfg.rotary != 'none' else ''}"
            f"{', gated MLP' if cfg.gated_mlp else ''}, final norm on "
            f"{cfg.final_norm}; pooling {cfg.global_pool}"
            f"{' + distillation head' if cfg.n_dist else ''}"
            f"{f'; projection to {cfg.d_proj}' if cfg.d_proj else ''}; {cfg.n_classes} classes",
            f"processing: fold_ln={cfg.fold_ln} center_writing_weights={cfg.center_writing_weights} "
            f"fold_value_biases={cfg.fold_value_biases} use_attn_result={cfg.use_attn_result}",
        ]
        return "\n".join(parts)

    def preprocess(self, image) -> Tensor:
        """An HxWx3 uint8 array or PIL image -> [1, 3, H, W] tensor the way the source expects."""
        from ..images import to_model_input

        return to_model_input(image, self.cfg).to(self.cfg.device)
