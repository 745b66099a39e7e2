"""How much work each report section does: scaled to the model by default, full with `--thorough`.

A forward pass of ViT-B/16 costs about 0.3 s per image on a 2-core CPU, so the full versions of
patching (every token at every layer, every head) and of the Captum comparison (50 IG steps,
one ablation per patch, 16-step curves) take minutes there. The default keeps every section and
coarsens what scales with the model: patches grouped into blocks, a subset of layers, fewer IG
steps (the convergence delta is shown), fewer samples, shorter curves. A model whose forward is
cheap (the built-in ones) gets the full versions anyway. The coarse numbers (4 layers, 4 IG steps,
2 samples, 2-step curves) are what fits a ViT-B/16 report in about a minute on 2 CPU cores
(bench/bench_report.py); they are not tuned for accuracy, which --thorough is for.
"""

from __future__ import annotations

from dataclasses import dataclass

# one forward's cost below which the full versions run by default (~ the cost of a ViT-S/16 at
# 224 px / 8: the built-in models and other small ones); in units of d_model^2 * tokens * layers
CHEAP = 384 ** 2 * 197 * 12 / 8
PATCHED_LAYERS = 4  # evenly spaced, the first and the last included, when the model has more


@dataclass(frozen=True)
class Settings:
    """What the sections run. `positions`: the activation-patching grid ("all" or "blocks:K");
    `layers`: the layers patched (None: all); `heads`: patch each head's z; `minimal_counts`:
    at most this many patch counts tried for the minimal patch (None: every count up to 100
    patches); `ig_steps`, `shap_samples`: Captum's; `ablation_block`: Captum's feature ablation
    removes K x K patch blocks (1: each patch); `curve_steps`: deletion/insertion steps."""

    thorough: bool
    positions: str = "all"
    layers: tuple[int, ...] | None = None
    heads: bool = True
    minimal_counts: int | None = None
    ig_steps: int = 50
    shap_samples: int = 16
    ablation_block: int = 1
    curve_steps: int = 16

    def describe(self) -> str:
        """One line for the report: what was coarsened, and how to get the full versions."""
        if self.thorough:
            return "Full versions of every section (every token, layer and head patched; 50 IG steps)."
        layers = "every layer" if self.layers is None else f"layers {', '.join(map(str, self.layers))}"
        return (f"Settings scaled to this model: patching on {self.positions.replace('blocks:', '')} x "
                f"{self.positions.replace('blocks:', '')} patch blocks at {layers}"
                f"{', no per-head patching' if not self.heads else ''}; Captum with {self.ig_steps} IG steps, "
                f"{self.shap_samples} GradientShap samples, feature ablation of {self.ablation_block} x "
                f"{self.ablation_block} blocks; {self.curve_steps}-step deletion/insertion curves. "
                "prisma-ext report --thorough runs the full versions.")


def forward_cost(cfg) -> float:
    """A forward pass's cost in d_model^2 * tokens * layers (the blocks' matrix products)."""
    return cfg.d_model ** 2 * cfg.layout.n_tokens * cfg.n_layers


def settings_for(cfg, thorough: bool = False) -> Settings:
    """The report's settings for a model of `cfg` (a ViTConfig): full when asked or cheap."""
    if thorough or forward_cost(cfg) <= CHEAP:
        return Settings(thorough=True)
    from ..analysis.patching.positions import block_size

    grid = cfg.layout.grid
    n = cfg.n_layers
    layers = None if n <= PATCHED_LAYERS else tuple(sorted({round(i * (n - 1) / (PATCHED_LAYERS - 1))
                                                            for i in range(PATCHED_LAYERS)}))
    return Settings(thorough=False, positions=f"blocks:{block_size(grid, 3)}", layers=layers, heads=False,
                    minimal_counts=6, ig_steps=4, shap_samples=2, ablation_block=block_size(grid, 3),
                    curve_steps=2)
