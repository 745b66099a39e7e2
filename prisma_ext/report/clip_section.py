"""The report's section for a CLIP model: its image embedding split by head (Gandelsman, Efros &
Steinhardt, ICLR 2024), the TextSpan texts of the heads that add the most, and high-norm tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from .page import Page
from .sections import Context

SPAN_SCENES = 16  # seeded scenes that TextSpan and the high-norm summary run over, with the report's image
SPAN_HEADS = 3  # the heads that add the most to the score get a TextSpan basis
SPAN_K = 3  # texts per head
BANK_CLASSES = 64  # the text bank: the prompts of at most this many classes (the image's top classes)


def splits_by_head(ctx: Context) -> bool:
    """Whether the report gets the CLIP section: a CLIP model on the TL backend (a HookedCLIP)."""
    from ..analysis.backend import Backend

    return ctx.is_clip and Backend.of(ctx.model).kind == "tl"


def _prompt_templates(ctx: Context) -> list[str]:
    """The templates of the zero-shot head: a built-in CLIP's own, else "a photo of a {}."."""
    from .inputs import BUILTIN, CLIP_TEMPLATE, zero_shot_classes

    return zero_shot_classes(ctx.source)[1] if ctx.source.startswith(BUILTIN) else [CLIP_TEMPLATE]


def _span_images(ctx: Context) -> Tensor:
    """The report's image and SPAN_SCENES seeded scenes at the model's size (drawn as a built-in
    model's training scenes were), normalised as the model's input: [1 + n, 3, H, W]."""
    from ..data.scenes import make_scenes
    from ..images import normalize_pixels
    from .inputs import scene_options

    cfg = ctx.cfg
    height, width = cfg.img_size
    if height != width:  # the scenes are square; TextSpan then runs on the two report images
        return torch.cat([ctx.x, ctx.x_corrupted])
    scenes = make_scenes(SPAN_SCENES, seed=1, size=height, **scene_options(ctx.source)).images
    return torch.cat([ctx.x, normalize_pixels(scenes, cfg).to(ctx.x)])


def embedding_by_head(ctx: Context, page: Page) -> None:
    """CLIP only: the image's cosine with the target's prompt split by layer and head (and the
    other parts), TextSpan texts of the heads that add the most, and the high-norm summary."""
    from ..analysis.clip_decomposition import clip_decomposition, decomposition_scores
    from ..analysis.high_norm import high_norm_tokens
    from ..analysis.text_span import text_span
    from ..viz.clip import decomposition_figure, high_norm_figure

    templates = _prompt_templates(ctx)
    text = templates[0].format(ctx.name(ctx.target))
    parts = clip_decomposition(ctx.model, ctx.x, tokens=False)
    scores = decomposition_scores(parts, ctx.model, [text])
    fig = decomposition_figure(scores, text=0, batch=0)
    page.figure(fig)
    meta = fig.layout.meta
    page.note(f"The image embedding (before it is normalised) is an exact sum of what each attention head writes "
              "at the pooled token, each MLP, each attention output bias, the embedding entering block 0 and a "
              "constant (the biases after the final norm), with the final norm's scale frozen at its value on "
              f"this image (Gandelsman, Efros & Steinhardt, ICLR 2024). Each part is dotted with the unit-norm "
              f"embedding of the text {text!r} and divided by the image embedding's norm, so the parts add up to "
              f"the image's cosine with that text, {meta['score']:.4f}: heads {meta['heads']:.4f}, MLPs "
              f"{meta['mlp']:.4f}, attention biases {meta['attn_bias']:.4f}, embedding {meta['embedding']:.4f}, "
              f"constant {meta['constant']:.4f} (largest miss of the decomposition: "
              f"{parts.meta['max_error']:.1e}). The zero-shot head scores the mean of the class's "
              f"{len(templates)} prompt{'s' if len(templates) > 1 else ''} rather than this one, so its logit "
              "differs a little.")
    # TextSpan for the heads that add the most
    per_head = scores.values[0, :, :, 0]  # [layer, head]
    n_heads = per_head.shape[1]
    top = torch.argsort(per_head.flatten(), descending=True)[:SPAN_HEADS].tolist()
    pairs = [divmod(i, n_heads) for i in top]
    ranked = torch.argsort(ctx.logits, descending=True)[:BANK_CLASSES].tolist()
    bank = [t.format(ctx.name(c)) for c in ranked for t in templates]
    images = _span_images(ctx)
    k = min(SPAN_K, len(bank))
    span = text_span(ctx.model, images, bank, heads=pairs, k=k)
    rows = []
    for row, (layer, head) in enumerate(pairs):
        texts = list(span.meta["texts"][row]) + [""] * (k - len(span.meta["texts"][row]))
        explained = " / ".join(f"{float(v):.2f}" for v in span.values[row] if v == v)
        rows.append([f"L{layer}H{head}", float(per_head[layer, head]), *texts, explained])
    page.table(rows, ["head", "its part of the cosine", *[f"TextSpan text {j + 1}" for j in range(k)],
                      f"variance explained by 1{'' if k == 1 else f' to {k}'} texts"])
    scope = "the top classes' " if len(ranked) < len(ctx.names) else ""
    page.note(f"TextSpan (same paper) for the {len(pairs)} heads that add the most to the cosine: over "
              f"{images.shape[0]} images (this one and {images.shape[0] - 1} seeded scenes), each head's outputs "
              f"are centred, then the text of the bank ({len(bank)} prompts: {scope}class names in the zero-shot "
              "templates) whose direction holds the most of their variance is picked, projected out, and so on. "
              "A head whose texts name one class writes that class; the variance explained says how much of "
              "what the head writes such texts capture.")
    # high-norm tokens
    hn = high_norm_tokens(ctx.model, images)
    page.figure(high_norm_figure(hn))
    lay = ctx.layout
    norms = hn.values[..., lay.patch_slice]  # [batch, layer, patch]
    ratio = float((norms.max(-1).values / norms.median(-1).values).max())
    factor = hn.meta["factor"]
    if hn.meta["n_outliers"] == 0:
        page.note(f"No high-norm tokens under the rule: {hn.meta['rule']} (factor {factor:g}). Over these "
                  f"{norms.shape[0]} images the largest patch norm is {ratio:.2f} x its image's median at most.")
    else:
        neurons = ", ".join(map(str, hn.meta["neurons"][:5]))
        page.note(f"{hn.meta['n_outliers']} high-norm tokens under the rule: {hn.meta['rule']} (factor {factor:g}); "
                  f"the first at layer {hn.meta['layer']}, where the MLP neurons that write most of their norm "
                  f"are {neurons} (each neuron's exact share of the outliers' norm). Largest patch norm: "
                  f"{ratio:.2f} x its image's median.")
