"""The analysis layer on a traced CLIP (nnsight backend) equals the same call on the HookedCLIP of
the same module (TL backend) within 1e-5: small random open_clip and Hugging Face CLIPs, every
parameter randomised. Each comparison also checks that the TL result of a CLIP with other random
weights differs, so a comparison of two things that cannot differ would fail."""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from prisma_ext.analysis.backend import Backend, NNsightBackend, TLBackend
from prisma_ext.analysis.clip_backend import TracedCLIPBackend
from prisma_ext.analysis.clip_decomposition import decomposition_scores, text_embeddings
from prisma_ext.errors import InputError, PrismaError
from tests.support.clip_models import small_hf_clip, small_open_clip, swapped_attention
from tests.support.models import module_hooks

ATOL = 1e-5
TEXTS = ["a red circle", "a blue square", "a green triangle", "a photo of a dog"]
CLASSES = ["circle", "square", "dog"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}"]
DIFFS: dict[str, float] = {}  # the largest traced-vs-TL difference of each comparison (for the record)


def source(kind: str, seed: int):
    return small_open_clip("ViT-B-32", seed=seed) if kind == "open_clip" else small_hf_clip(seed=seed)


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def clips(request):
    """(source module, HookedCLIP, TracedCLIP, HookedCLIP of other weights, images, corrupted),
    the three models with the same zero-shot head installed."""
    kind = request.param
    src = source(kind, seed=0)
    tl, traced, other = px.load(src), px.load(src, backend="nnsight"), px.load(source(kind, seed=1))
    for model in (tl, traced, other):
        model.use_zero_shot_head(CLASSES, TEMPLATES)
    gen = torch.Generator().manual_seed(5)
    images, corrupted = torch.randn(4, 3, 32, 32, generator=gen), torch.randn(4, 3, 32, 32, generator=gen)
    return src, tl, traced, other, images, corrupted


def same(name: str, got, want, other) -> None:
    """got == want within ATOL, and `other` (a model with other weights) measurably not."""
    got, want, other = (x if isinstance(x, torch.Tensor) else x.values for x in (got, want, other))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=name)
    assert (other - want).abs().max() > 100 * ATOL, f"{name}: the comparison cannot tell models apart"
    DIFFS[name] = max(DIFFS.get(name, 0.0), float((got - want).abs().max()))


# ---------------------------------------------------------------- the backend and the text side
def test_the_backend_is_the_vision_tower_with_the_tl_output(clips):
    src, tl, traced, other, images, _ = clips
    backend = Backend.of(traced)
    assert type(backend) is TracedCLIPBackend and backend.kind == "nnsight"
    assert set(backend.site_names) <= set(Backend.of(tl).site_names)
    assert {"blocks.1.attn.hook_v", "blocks.1.attn.hook_pattern", "hook_image_embed"} <= set(backend.site_names)
    assert backend.class_names == CLASSES == traced.class_names and backend.cfg.n_classes == 3
    assert backend.output_site is None and Backend.of(tl).output_site is None  # a head: logits
    same("zero-shot logits", backend.output(images), Backend.of(tl).output(images), Backend.of(other).output(images))
    embeds = TracedCLIPBackend(traced, return_type="embeds")
    assert embeds.output_site == "hook_image_embed" == TLBackend(tl, tl.visual, "embeds").output_site
    with torch.no_grad():
        want = tl.encode_image(images)
        same("image embedding", embeds.output(images), want, other.encode_image(images))
        same("encode_image", traced.encode_image(images, normalize=True), tl.encode_image(images, normalize=True),
             other.encode_image(images, normalize=True))
    # the output is the traced forward's: an edit reaches it as the same TL hook does
    site, edit = "blocks.0.hook_mlp_out", {"blocks.0.hook_mlp_out": torch.zeros_like}
    with torch.no_grad():
        run, tl_run = backend.run(images, read=[site], edit=edit), Backend.of(tl).run(images, read=[site], edit=edit)
    assert run.acts[site].abs().max() == 0
    same("edited output", run.output, tl_run.output, backend.output(images))


def test_text_embeddings_come_from_a_trace_of_the_source(clips):
    src, tl, traced, other, *_ = clips
    tokens = traced.tokenize(TEXTS)
    assert torch.equal(tokens, tl.tokenize(TEXTS)) and traced.tokenizer.context_length == tl.tokenizer.context_length
    with torch.no_grad():
        same("encode_text", traced.encode_text(TEXTS), tl.encode_text(TEXTS), other.encode_text(TEXTS))
        same("encode_text(tokens)", traced.encode_text(tokens), tl.encode_text(tokens), other.encode_text(tokens))
    same("text_embeddings", text_embeddings(traced, TEXTS, "m"), text_embeddings(tl, TEXTS, "m"),
         text_embeddings(other, TEXTS, "m"))
    same("zero_shot_classifier", traced.zero_shot_classifier(CLASSES, TEMPLATES),
         tl.zero_shot_classifier(CLASSES, TEMPLATES), other.zero_shot_classifier(CLASSES, TEMPLATES))
    # the source's own text tower runs: changing its weights changes the traced embedding, not the converted one
    weight = (src.token_embedding if hasattr(src, "token_embedding")
              else src.text_model.embeddings.token_embedding).weight
    kept = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(2.0)
            moved = (traced.encode_text(tokens) - tl.encode_text(tokens)).abs().max()
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    assert moved > 1e-3
    with pytest.raises(InputError, match="longer than the text tower's context"):
        text_embeddings(traced, ["a very long description " * 30], "m")


# ---------------------------------------------------------------- the vision methods
def test_logit_lens_and_direct_logit_attribution(clips):
    _, tl, traced, other, images, _ = clips
    same("logit_lens", px.logit_lens(traced, images), px.logit_lens(tl, images), px.logit_lens(other, images))
    by = ("layer", "head", "source")
    got, want, far = (px.direct_logit_attribution(m, images, 1, by=by) for m in (traced, tl, other))
    same("dla", got, want, far)
    same("dla head", got.part("head"), want.part("head"), far.part("head"))
    same("dla source", got.part("source"), want.part("source"), far.part("source"))


def test_attention_maps(clips):
    _, tl, traced, other, images, _ = clips
    same("rollout", px.attention_rollout(traced, images), px.attention_rollout(tl, images),
         px.attention_rollout(other, images))
    target = px.LogitDiff(0, 2)
    same("gradient_attention", px.gradient_attention(traced, images, target),
         px.gradient_attention(tl, images, target), px.gradient_attention(other, images, target))


def test_activation_patching(clips):
    _, tl, traced, other, images, corrupted = clips
    clean, corr = images[:2], corrupted[:2]

    def patch(model):
        return px.activation_patching(model, clean, corr, px.LogitDiff(0, 1), sites=["resid_pre", "z"],
                                      positions="patches", progress=False)

    got, want, far = patch(traced), patch(tl), patch(other)
    for site in want:
        same(f"patching {site}", got[site], want[site], far[site])


# ---------------------------------------------------------------- the CLIP methods
def test_clip_decomposition_and_its_scores(clips):
    _, tl, traced, other, images, _ = clips
    got, want, far = (px.clip_decomposition(m, images) for m in (traced, tl, other))
    assert got.meta["backend"] == "nnsight" and got.meta["max_error"] < 1e-4
    same("decomposition", got, want, far)
    for part in ("token", "attn_bias", "mlp", "embedding", "constant"):
        same(f"decomposition {part}", got.part(part), want.part(part), far.part(part))
    same("decomposition image_embedding", got.meta["image_embedding"], want.meta["image_embedding"],
         far.meta["image_embedding"])
    z = px.clip_decomposition(traced, images, tokens=False, batch_size=3)  # heads read from hook_z, in chunks
    same("decomposition tokens=False", z, want, far)
    scores = [decomposition_scores(r, m, TEXTS) for r, m in ((got, traced), (want, tl), (far, other))]
    same("decomposition_scores", *scores)
    same("decomposition_scores token", *(s.part("token") for s in scores))
    same("decomposition_scores score", *(s.meta["score"] for s in scores))


def test_text_span(clips):
    _, tl, traced, other, images, _ = clips
    heads = [(0, 1), (1, 0), (1, 2)]
    got, want, far = (px.text_span(m, images, TEXTS, heads=heads, k=3) for m in (traced, tl, other))
    assert got.meta["texts"] == want.meta["texts"]
    same("text_span", got.values.nan_to_num(), want.values.nan_to_num(), far.values.nan_to_num())


def test_head_ablation(clips):
    _, tl, traced, other, images, _ = clips
    labels = [0, 1, 2, 0]
    for given in ((CLASSES, TEMPLATES), ()):  # the classes given, then the installed zero-shot head
        got, want, far = (px.head_ablation(m, images, labels, *given) for m in (traced, tl, other))
        torch.testing.assert_close(got.values, want.values, atol=0, rtol=0)
        for part in ("layer", "from_layer", "up_to_layer"):
            torch.testing.assert_close(got.part(part).values, want.part(part).values, atol=0, rtol=0)
        assert got.meta["clean_accuracy"] == want.meta["clean_accuracy"]
        assert got.meta["class_names"] == CLASSES
        assert not torch.equal(torch.cat([far.values.flatten(), far.part("from_layer").values]),
                               torch.cat([want.values.flatten(), want.part("from_layer").values]))


def test_zero_shot_segmentation(clips):
    _, tl, traced, other, images, _ = clips
    same("segmentation", *(px.zero_shot_segmentation(m, images, TEXTS) for m in (traced, tl, other)))
    same("segmentation labels", *(px.zero_shot_segmentation(m, images, TEXTS, labels=[0, 1, 2, 3])
                                  for m in (traced, tl, other)))


# ---------------------------------------------------------------- what is refused, and state
def test_image_text_patching_of_the_vision_tower(clips):
    """image_text_patching (tower='visual') and an ImageTextScore target on a traced CLIP: the TL
    backend's sweep; the logit scale is the source's own."""
    _, tl, traced, other, images, corrupted = clips
    assert float(traced.logit_scale) == pytest.approx(float(tl.logit_scale), abs=1e-6)
    kw = dict(sites=("resid_pre", "z"), positions="rows", progress=False)
    got = px.image_text_patching(traced, images, corrupted, TEXTS[:2], **kw)
    want, far = (px.image_text_patching(m, images, corrupted, TEXTS[:2], **kw) for m in (tl, other))
    assert got.meta["backend"] == "nnsight"
    for site in ("resid_pre", "z"):
        same(f"image_text_patching {site}", got[site], want[site], far[site])
    target = px.ImageTextScore(TEXTS[:1])
    got, want, far = (px.activation_patching(m, images, corrupted, target, sites=("resid_pre",), progress=False)
                      for m in (TracedCLIPBackend(traced, "embeds"), TLBackend(tl, tl.visual, "embeds"),
                                TLBackend(other, other.visual, "embeds")))
    same("ImageTextScore patching", got["resid_pre"], want["resid_pre"], far["resid_pre"])
    got, want, far = (px.direct_logit_attribution(m, images, target)
                      for m in (TracedCLIPBackend(traced, "embeds"), TLBackend(tl, tl.visual, "embeds"),
                                TLBackend(other, other.visual, "embeds")))
    same("ImageTextScore DLA", got, want, far)


def test_image_text_patching_of_the_text_tower(clips):
    """tower='text' on a traced CLIP: the text tower traced as a backend (TracedTextBackend, the
    source's own text encoder), the TL backend's sweep."""
    _, tl, traced, other, images, _ = clips
    clean, corrupted = ["a red circle", "a big square"], ["a blue circle", "a small square"]
    kw = dict(images=images[:1], tower="text", progress=False)
    got, want, far = (px.image_text_patching(m, clean, corrupted, **kw) for m in (traced, tl, other))
    assert got.meta["backend"] == "nnsight"
    for site in want:
        same(f"text-tower patching {site}", got[site], want[site], far[site])


def test_what_still_needs_a_hooked_clip_is_refused_by_name(clips):
    _, tl, traced, _, images, corrupted = clips
    with pytest.raises(InputError, match="needs a HookedCLIP or a TracedCLIP.*got HookedViT"):
        px.clip_decomposition(tl.visual, images)


def test_runs_leave_no_state_behind(clips):
    src, tl, traced, other, images, _ = clips
    backend = Backend.of(traced)
    want = backend.output(images)
    swaps, hooks, rng = swapped_attention(src), module_hooks(src), torch.get_rng_state()

    def boom(value):
        raise RuntimeError("a user's edit fails")

    src.train()
    try:
        with pytest.raises(RuntimeError, match="a user's edit fails"):
            backend.run(images, edit={"blocks.1.attn.hook_pattern": boom})
        assert all(m.training for m in src.modules())  # the caller's mode is back, also after the error
        px.clip_decomposition(traced, images[:2])
        traced.encode_text(TEXTS[:1])
        assert all(m.training for m in src.modules())
    finally:
        src.eval()
    assert swapped_attention(src) == swaps and module_hooks(src) == hooks == {}
    assert torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(backend.output(images), want, atol=0, rtol=0)


def test_a_vision_tower_alone_is_traced_as_a_vit():
    from transformers import CLIPVisionModel

    src, far = small_hf_clip(seed=0), small_hf_clip(seed=1)
    vision, other = (CLIPVisionModel(m.config.vision_config).eval() for m in (src, far))
    vision.load_state_dict(src.vision_model.state_dict())
    other.load_state_dict(far.vision_model.state_dict())
    tl, traced, other = px.load(vision), px.load(vision, backend="nnsight"), px.load(other)
    assert type(Backend.of(traced)) is NNsightBackend and traced.towers == {"visual": ""}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    same("vision tower output", Backend.of(traced).output(images), Backend.of(tl).output(images),
         Backend.of(other).output(images))
    same("vision tower rollout", px.attention_rollout(traced, images), px.attention_rollout(tl, images),
         px.attention_rollout(other, images))
    with pytest.raises(InputError, match="needs both towers"):
        px.clip_decomposition(traced, images)


def test_a_remote_folder_is_refused_before_anything_is_sent(tmp_path):
    """The methods run on a remote CLIP (tests/traced/test_remote_methods.py), but a saved folder
    cannot be rebuilt by a server: the first request (the weights the readout needs) is refused
    as such, before anything is sent."""
    small_hf_clip(seed=0).save_pretrained(tmp_path)
    remote = px.load(f"hf:{tmp_path}", backend="nnsight", remote=True)
    with pytest.raises(PrismaError, match="is a local folder"):
        Backend.of(remote)
    with pytest.raises(PrismaError, match="is a local folder"):
        px.clip_decomposition(remote, torch.randn(2, 3, 32, 32))
