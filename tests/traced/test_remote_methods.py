"""The analysis methods on remote models, each forward pass a request run where prisma_ext is
absent.

A saved Hugging Face ViT and CLIP (random weights) are loaded with `remote=True`, so the client
holds their skeletons on the meta device and no weights. Every trace the methods send goes to an
in-process server (`tests.support.hidden.HiddenServer`): the model nnsight builds from the
client's key, with prisma_ext out of sys.modules and refused by a meta-path finder while the
request is deserialised and run. Each method's numbers equal the same method on the local trace
of the source module, and differ on a model with other weights (so the comparison can fail).
After all of it the client still holds no real parameter.
"""

from __future__ import annotations

import math

import pytest
import torch
from nnsight.modeling.mixins.remotable import Remotable

import prisma_ext as px
from prisma_ext.analysis.backend import Backend
from prisma_ext.analysis.backend_remote import RemoteBackend, RemoteCLIPBackend
from prisma_ext.errors import PrismaError
from prisma_ext.traced.remote import model_key
from tests.adapters.test_hf_vit import images_for, small_vit
from tests.support.clip_models import small_hf_clip
from tests.support.hidden import HiddenServer, prisma_ext_hidden

ATOL = 1e-6
NAMES = ("raw", "acts", "grads", "params", "out")  # what the bodies bind (run, fetch, embed)
CLASSES = ["circle", "square", "dog"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}"]
TEXTS = ["a red circle", "a blue square", "a green triangle", "a photo of a dog"]


class Rig:
    """A remote client whose every trace runs on an in-process server without prisma_ext."""

    def __init__(self, src, other, folder: str, images, corrupted):
        self.client = px.load(f"hf:{folder}", backend="nnsight", remote=True)
        with prisma_ext_hidden():
            self.server = Remotable.from_model_key(model_key(self.client, allow_folder=True), dispatch=True)
        self.local, self.other = px.load(src, backend="nnsight"), px.load(other, backend="nnsight")
        self.images, self.corrupted = images, corrupted
        self.workers: list[HiddenServer] = []

    def served(self, monkeypatch):
        trace, rig = type(self.client).trace, self

        def on_the_server(model, *args, **kwargs):
            rig.workers.append(HiddenServer(rig.server, NAMES))
            return trace(model, *args, backend=rig.workers[-1], **kwargs)

        monkeypatch.setattr(type(self.client), "trace", on_the_server)
        return self

    def compare(self, name: str, method, parts=()) -> int:
        """method(client) == method(local) within ATOL and != method(other); each request ran
        hidden; returns the number of round trips."""
        before = len(self.workers)
        got = method(self.client)
        trips = len(self.workers) - before
        want, far = method(self.local), method(self.other)
        for what, g, w, f in _pairs(name, got, want, far, parts):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=what)
            assert (f - w).abs().max() > 100 * ATOL, f"{what}: the comparison cannot tell models apart"
        for worker in self.workers[before:]:
            assert worker.blocker.checked and not worker.blocker.attempts
        assert not [p for p in self.client._module.parameters() if not p.is_meta], "weights materialised here"
        return trips


def _values(x):
    return x if isinstance(x, torch.Tensor) else x.values


def _pairs(name, got, want, far, parts):
    if hasattr(want, "results"):  # a ResultSet
        for key in want:
            yield f"{name} {key}", got[key].values, want[key].values, far[key].values
        return
    yield name, _values(got).nan_to_num(), _values(want).nan_to_num(), _values(far).nan_to_num()
    for part in parts:
        yield f"{name} {part}", got.part(part).values, want.part(part).values, far.part(part).values


@pytest.fixture(scope="module")
def vit_rig(tmp_path_factory):
    from transformers import ViTImageProcessor

    src, other = small_vit(seed=11), small_vit(seed=12)
    folder = tmp_path_factory.mktemp("vit_remote_methods")
    src.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return Rig(src, other, str(folder), images_for(src, batch=3), images_for(src, batch=3, seed=7))


@pytest.fixture(scope="module")
def clip_rig(tmp_path_factory):
    src, other = small_hf_clip(seed=5), small_hf_clip(seed=6)
    folder = tmp_path_factory.mktemp("clip_remote_methods")
    src.save_pretrained(folder)
    gen = torch.Generator().manual_seed(5)
    images, corrupted = torch.randn(3, 3, 32, 32, generator=gen), torch.randn(3, 3, 32, 32, generator=gen)
    rig = Rig(src, other, str(folder), images, corrupted)
    for model in (rig.local, rig.other):
        model.use_zero_shot_head(CLASSES, TEMPLATES)
    return rig


@pytest.fixture
def vit(vit_rig, monkeypatch):
    return vit_rig.served(monkeypatch)


@pytest.fixture
def clip(clip_rig, monkeypatch):
    rig = clip_rig.served(monkeypatch)
    if rig.client.zero_shot_head is None:  # text embeddings: traces of the text tower, on the server
        before = len(rig.workers)
        rig.client.use_zero_shot_head(CLASSES, TEMPLATES)
        assert len(rig.workers) == before + 1
        torch.testing.assert_close(rig.client.zero_shot_head.weight, rig.local.zero_shot_head.weight, atol=ATOL, rtol=0)
    return rig


# ---------------------------------------------------------------- a ViT
def test_backend_and_weights_come_from_the_server(vit):
    backend = Backend.of(vit.client)
    assert type(backend) is RemoteBackend and backend.kind == "remote" and not backend.can_restart
    local = Backend.of(vit.local).vit
    fetched = {n: p for n, p in backend.vit.named_parameters()}
    assert set(fetched) == {n for n, _ in local.named_parameters()
                            if n.startswith(("ln_final.", "head.")) or ".attn.proj." in n}
    for name, value in fetched.items():
        torch.testing.assert_close(value, local.get_parameter(name), atol=0, rtol=0, msg=name)
    with pytest.raises(PrismaError, match=r"blocks.0.mlp.fc2.weight \[.*\] is not downloaded for a remote model"):
        backend.vit.blocks[0].mlp.W_out.detach()
    with pytest.raises(PrismaError, match="blocks.1.attn.qkv.weight"):
        torch.einsum("ij,kj->ik", torch.ones(2, 48), backend.vit.blocks[1].attn.qkv.weight)


def test_lens_attribution_and_attention(vit):
    images = vit.images
    vit.compare("logit_lens", lambda m: px.logit_lens(m, images))
    trips = vit.compare("dla", lambda m: px.direct_logit_attribution(m, images, 1, by=("layer", "head", "source")),
                        parts=("head", "source"))
    assert trips == 1  # one trace: the weights were saved by the first method
    assert vit.compare("rollout", lambda m: px.attention_rollout(m, images)) == 1
    # a gradient: the output back here, then nnsight's backward inside a second trace
    assert vit.compare("gradient_attention", lambda m: px.gradient_attention(m, images, px.LogitDiff(0, 2))) == 2
    vit.compare("head_patterns", lambda m: px.head_patterns(m, images))
    vit.compare("readout_attention", lambda m: px.readout_attention(m, images))
    saliency = px.attention_rollout(vit.local, images)  # one attribution, scored by each model's deletions
    vit.compare("faithfulness", lambda m: px.faithfulness(m, images, 1, maps=saliency))


def test_a_method_fetches_the_weights_it_needs_beyond_the_readout(vit):
    """high_norm_tokens splits the outliers by the MLP neurons of their layer with W_out: the
    remote backend fetches that one matrix (one more trip), nothing else."""
    got = px.high_norm_tokens(vit.client, vit.images, factor=1.2)
    want = px.high_norm_tokens(vit.local, vit.images, factor=1.2)
    layer = want.meta["layer"]
    assert layer is not None and want.meta["neurons"], "no outliers: the neuron split was not exercised"
    torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)
    assert got.meta["neurons"] == want.meta["neurons"]
    vit_weights = Backend.of(vit.client).vit
    torch.testing.assert_close(vit_weights.blocks[layer].mlp.W_out, Backend.of(vit.local).vit.blocks[layer].mlp.W_out,
                               atol=0, rtol=0)
    other = 1 - layer if layer in (0, 1) else 0
    with pytest.raises(PrismaError, match="is not downloaded"):
        vit_weights.blocks[other].mlp.W_out.sum()


def test_patching_takes_a_few_traces(vit):
    clean, corrupted = vit.images[:2], vit.corrupted[:2]

    def patch(model):
        return px.activation_patching(model, clean, corrupted, px.LogitDiff(0, 1), sites=["resid_pre"],
                                      positions="all", batch_size=12, progress=False)

    trips = vit.compare("activation_patching", patch)
    runs = 2 * Backend.of(vit.local).cfg.n_layers * vit.local.layout.n_tokens
    assert trips <= math.ceil(runs / 12) + 3  # the clean, corrupted and identity-check runs
    assert vit.compare("attribution_patching", lambda m: px.attribution_patching(m, clean, corrupted,
                                                                                 px.LogitDiff(0, 1))) <= 4


def test_an_edit_that_is_local_code_runs_between_round_trips(vit):
    """An edit that is prisma-ext (or the user's) code runs here: a trip reads the site, the edit
    runs, the next trip sets the result; the numbers are the local trace's."""
    backend, local = Backend.of(vit.client), Backend.of(vit.local)
    edit = {"blocks.0.hook_mlp_out": lambda v: v.flip(1) * 0.5, "blocks.1.attn.hook_z": lambda v: v * 2}
    read = ["blocks.1.hook_resid_post"]
    before = len(vit.workers)
    with torch.no_grad():
        got, want = backend.run(vit.images, read=read, edit=edit), local.run(vit.images, read=read, edit=edit)
    assert len(vit.workers) - before == 3  # one per local edit, then the run
    torch.testing.assert_close(got.output, want.output, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.acts[read[0]], want.acts[read[0]], atol=ATOL, rtol=0)
    assert (got.output - local.output(vit.images)).abs().max() > 1e-3  # the edits changed the output
    with pytest.raises(PrismaError, match="gradient through the edit of blocks.0.hook_mlp_out"):
        backend.run(vit.images, read=read, edit=edit, grad_of=lambda out: out.sum())


def test_what_cannot_run_remotely_is_refused_before_anything_is_sent(vit, clip):
    for rig, call, name in (
            (vit, lambda m: px.captum_attribution(m, vit.images, 1), "captum_attribution"),
            (vit, lambda m: px.test_time_register(m, vit.images, [0], layer=0), "test_time_register"),
            (clip, lambda m: px.second_order_effects(m, clip.images, 0), "second_order_effects"),
            (clip, lambda m: px.neuron_ablation(m, clip.images, [0, 1, 2], layers=[0]), "neuron_ablation")):
        Backend.of(rig.client)  # the weights, fetched once per model
        before = len(rig.workers)
        with pytest.raises(PrismaError, match=f"{name} cannot run on a remote model.*Nothing was sent"):
            call(rig.client)
        assert len(rig.workers) == before, name


# ---------------------------------------------------------------- a CLIP
def test_clip_backend_and_readout(clip):
    backend = Backend.of(clip.client)
    assert type(backend) is RemoteCLIPBackend and backend.class_names == CLASSES
    clip.compare("zero-shot logits", lambda m: Backend.of(m).output(clip.images))
    clip.compare("logit_lens", lambda m: px.logit_lens(m, clip.images))
    clip.compare("dla", lambda m: px.direct_logit_attribution(m, clip.images, 1, by=("layer", "head")), parts=("head",))
    clip.compare("gradient_attention", lambda m: px.gradient_attention(m, clip.images, px.LogitDiff(0, 2)))


def test_clip_methods(clip):
    images = clip.images
    clip.compare("clip_decomposition", lambda m: px.clip_decomposition(m, images), parts=("token", "mlp"))
    clip.compare("text_span", lambda m: px.text_span(m, images, TEXTS, heads=[(0, 1), (1, 0)], k=2))
    clip.compare("zero_shot_segmentation", lambda m: px.zero_shot_segmentation(m, images, TEXTS))
    got, want = (px.head_ablation(m, images, [0, 1, 2]) for m in (clip.client, clip.local))  # accuracies
    for part in (None, "from_layer", "up_to_layer"):
        torch.testing.assert_close((got.part(part) if part else got).values, (want.part(part) if part else want).values,
                                   atol=0, rtol=0, msg=f"head_ablation {part}")
    clip.compare("activation_patching", lambda m: px.activation_patching(
        m, images[:2], clip.corrupted[:2], px.LogitDiff(0, 1), sites=["z"], positions="patches", progress=False))
    clip.compare("image_text_patching", lambda m: px.image_text_patching(
        m, images[:2], clip.corrupted[:2], TEXTS[:2], progress=False))


def test_the_text_tower_patched_on_the_server(clip):
    """tower='text': the text tower runs as its own remote backend (traces of the source's text
    encoder on token ids); its skeleton gives the pooling rule, and no text weight is fetched."""
    from prisma_ext.analysis.backend_remote import RemoteTextBackend
    from prisma_ext.analysis.remote_weights import Unfetched

    clean, corrupted = ["a red circle", "a big square"], ["a blue circle", "a small square"]
    kw = dict(images=clip.images[:1], tower="text", progress=False)
    clip.compare("text-tower patching", lambda m: px.image_text_patching(m, clean, corrupted, **kw))
    skeleton = RemoteTextBackend(clip.client, clip.client.tokenize(clean)).vit
    unfetched = [v for m in skeleton.modules() for v in vars(m).values() if isinstance(v, Unfetched)]
    assert unfetched and not list(skeleton.parameters())


def test_a_target_that_reads_a_site_takes_its_gradient_through_the_server(clip):
    """ImageTextScore reads the image embedding site (kept by the run): its gradient at that site
    travels back with the output's and is backpropagated in the second trace."""
    target = px.ImageTextScore(TEXTS[:1])
    clip.compare("gradient_attention ImageTextScore", lambda m: px.gradient_attention(m, clip.images, target))


def test_nnsight_s_own_simulation_with_prisma_ext_hidden(vit_rig):
    """remote="local" (nnsight serialises the request and runs it here, hiding local modules;
    `local_simulation_hides_prisma_ext` makes that hide real): the same numbers. nnsight's
    simulation runs on the client's own model, so it loads the weights here first (its design);
    the server stand-ins above are what keeps a client free of weights."""
    from tests.support.hidden import local_simulation_hides_prisma_ext

    client = px.load(f"hf:{vit_rig.client.repo_id}", backend="nnsight", remote="local")
    images, corrupted = vit_rig.images, vit_rig.corrupted
    with local_simulation_hides_prisma_ext() as hides:
        lens = px.logit_lens(client, images)
        saliency = px.gradient_attention(client, images, px.LogitDiff(0, 2))
        sweep = px.activation_patching(client, images[:2], corrupted[:2], px.LogitDiff(0, 1), sites=["z"],
                                       positions="rows", progress=False)
    assert len(hides) >= 4 and all(h.checked and not h.attempts for h in hides)
    local = vit_rig.local
    torch.testing.assert_close(lens.values, px.logit_lens(local, images).values, atol=ATOL, rtol=0)
    torch.testing.assert_close(saliency.values, px.gradient_attention(local, images, px.LogitDiff(0, 2)).values,
                               atol=ATOL, rtol=0)
    want = px.activation_patching(local, images[:2], corrupted[:2], px.LogitDiff(0, 1), sites=["z"],
                                  positions="rows", progress=False)
    torch.testing.assert_close(sweep["z"].values, want["z"].values, atol=ATOL, rtol=0)


def test_a_method_runs_on_a_server_in_a_fresh_interpreter(vit_rig, tmp_path, monkeypatch):
    """The strongest stand-in: each request runs in `python -I` with prisma_ext blocked before
    anything imports, nnsight's class built from the key by nnsight alone, and cloudpickle
    rebuilding the envoy's classes from the source in the request. DLA's two requests (the
    weights, then the run) give the local trace's numbers."""
    from tests.support.hidden import SubprocessServer

    client = px.load(f"hf:{vit_rig.client.repo_id}", backend="nnsight", remote=True)
    key, workers, trace = model_key(client, allow_folder=True), [], type(client).trace

    def in_a_fresh_process(model, *args, **kwargs):
        workers.append(SubprocessServer(key, NAMES, tmp_path))
        return trace(model, *args, backend=workers[-1], **kwargs)

    monkeypatch.setattr(type(client), "trace", in_a_fresh_process)
    got = px.direct_logit_attribution(client, vit_rig.images, 1, by=("layer", "head"))
    want = px.direct_logit_attribution(vit_rig.local, vit_rig.images, 1, by=("layer", "head"))
    torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)
    assert len(workers) == 2
    for worker in workers:
        assert worker.report["attempts"] == [] and worker.report["prisma_modules"] == []
    assert not [p for p in client._module.parameters() if not p.is_meta]
