"""Remote tracing with prisma_ext absent where the request runs (an NDIF server has torch,
transformers and nnsight only).

prisma_ext is hidden for real (`tests.support.hidden`: out of sys.modules and refused by a
meta-path finder; nnsight's own simulation lets an installed prisma-ext be re-imported). Under
that hide, nnsight's `remote="local"` round trip reads and edits sites of a saved Hugging Face
CLIP and ViT with the local traces' numbers. A server in a fresh interpreter (`-I`, blocker
first) builds nnsight's class from `to_model_key()`, deserialises the request (cloudpickle
rebuilds the envoy's classes from their source there, as on NDIF) and runs it, with the same
numbers; an in-process stand-in does the same and is checked to leave everything as found.
Negative controls: a body that calls prisma-ext fails there, and so does the envoy when its
module is not shipped by value.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
from nnsight import save

import prisma_ext as px
from prisma_ext.errors import suggest
from prisma_ext.sitemaps import spec
from prisma_ext.traced import remote_envoy, remote_views
from prisma_ext.traced.remote import model_key, wire_sites, wire_view
from tests.adapters.test_hf_vit import images_for, small_vit
from tests.support.clip_models import small_hf_clip, text_tokens_for
from tests.support.hidden import (
    Blocker,
    HiddenServer,
    SubprocessServer,
    local_simulation_hides_prisma_ext,
    prisma_ext_hidden,
)
from tests.support.models import module_hooks

CLIP_READ = ["visual.blocks.0.hook_resid_pre", "visual.blocks.0.attn.hook_pattern", "visual.blocks.0.hook_attn_out",
             "visual.blocks.0.hook_mlp_out"]
CLIP_LATER = ["visual.blocks.1.hook_resid_post", "text.blocks.0.attn.hook_z", "text.blocks.1.hook_mlp_out",
              "text.hook_text_embed"]
VIT_READ = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]
VIT_LATER = ["blocks.1.hook_resid_post", "ln_final.hook_normalized", "hook_pooled"]


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    src = small_hf_clip(seed=5)
    folder = tmp_path_factory.mktemp("clip_hidden")
    src.save_pretrained(folder)
    return src, str(folder)


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    from transformers import ViTImageProcessor

    src = small_vit(seed=11)
    folder = tmp_path_factory.mktemp("vit_hidden")
    src.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)  # what a server's pipeline loads
    return src, str(folder)


def clip_inputs(model):
    tokens = text_tokens_for(model.text_cfg, batch=2, length=20)
    return dict(input_ids=tokens, pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))


def clip_values(model, inputs, **trace_kwargs):
    """Read residual, attention and MLP sites; make block 1's image attention uniform and zero its
    mid-block class token (an in-place site); read later sites of both towers and the logits."""
    uniform = torch.full((2, 3, 17, 17), 1 / 17)
    with torch.no_grad():
        with model.trace(**inputs, **trace_kwargs):
            values = save([])
            for name in CLIP_READ:
                values.append(model.site(name))
            model.set_site("visual.blocks.1.attn.hook_pattern", uniform)
            model.site("visual.blocks.1.hook_resid_mid")[:, 0] = 0
            for name in CLIP_LATER:
                values.append(model.site(name))
            logits = model.output.logits_per_image.save()
    return values, logits


def vit_values(model, images, **trace_kwargs):
    """Read sites of block 0; ablate head 1 of block 1 in place and replace its MLP output; read
    later sites and the logits."""
    with torch.no_grad():
        with model.trace(images, **trace_kwargs):
            values = save([])
            for name in VIT_READ:
                values.append(model.site(name))
            z = model.site("blocks.1.attn.hook_z")
            z[:, :, 1] = 0
            model.set_site("blocks.1.hook_mlp_out", torch.ones(48))
            for name in VIT_LATER:
                values.append(model.site(name))
            logits = model.output.logits.save()
    return values, logits


def assert_same(got, expected, names, atol=0.0):
    for name, a, b in zip(names, got[0], expected[0], strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)
    torch.testing.assert_close(got[1], expected[1], atol=atol, rtol=0)


def assert_left_as_found(module: torch.nn.Module) -> None:
    """No hooks, no attention module switched, nothing left registered with transformers, no
    blocker left on sys.meta_path, prisma_ext in sys.modules as it was."""
    from transformers import AttentionInterface

    assert not module_hooks(module)
    assert remote_views.EXPLICIT_ATTENTION not in AttentionInterface._global_mapping
    assert all(getattr(getattr(m, "config", None), "_attn_implementation", None) != remote_views.EXPLICIT_ATTENTION
               for m in module.modules())
    assert not any(isinstance(f, Blocker) for f in sys.meta_path)
    assert sys.modules["prisma_ext"] is px


# ---------------------------------------------------------------- nnsight's simulation, hidden for real
def test_local_simulation_of_clip_runs_without_prisma_ext(saved_clip):
    src, folder = saved_clip
    remote = px.load(f"hf:{folder}", backend="nnsight", remote="local")
    assert type(remote).__name__ == "RemoteTracedCLIP" and not remote.dispatched
    local = px.load(src, backend="nnsight")
    inputs = clip_inputs(local)
    expected = clip_values(local, inputs)
    with local_simulation_hides_prisma_ext() as hides:
        got = clip_values(remote, inputs)  # serialised, deserialised with prisma_ext unimportable, run
    assert len(hides) == 1 and hides[0].checked and hides[0].attempts == []
    assert_same(got, expected, CLIP_READ + CLIP_LATER)
    assert remote.site_names == local.site_names
    assert_left_as_found(remote._module)


def test_local_simulation_of_vit_runs_without_prisma_ext(saved_vit):
    src, folder = saved_vit
    remote = px.load(f"hf:{folder}", backend="nnsight", remote="local")
    assert type(remote).__name__ == "RemoteTracedViT" and not remote.dispatched
    local, images = px.load(src, backend="nnsight"), images_for(src)
    expected = vit_values(local, images)
    with local_simulation_hides_prisma_ext() as hides:
        got = vit_values(remote, images)
        with torch.no_grad():  # two invokes batch into one forward pass (the envoy's own _batch)
            with remote.trace() as tracer:
                with tracer.invoke(images[:1]):
                    first = remote.site("blocks.1.hook_resid_post").save()
                with tracer.invoke(images[1:]):
                    second = remote.site("blocks.1.hook_resid_post").save()
    assert len(hides) == 2 and all(h.checked and h.attempts == [] for h in hides)
    assert_same(got, expected, VIT_READ + VIT_LATER, atol=1e-6)
    with torch.no_grad():
        _, cache = local.run_with_cache(images, names_filter="blocks.1.hook_resid_post")
    torch.testing.assert_close(torch.cat([first, second]), cache["blocks.1.hook_resid_post"], atol=1e-6, rtol=0)
    assert_left_as_found(remote._module)


def test_the_key_names_nnsight_s_own_class(saved_clip, saved_vit, monkeypatch):
    """`to_model_key()` of a model loaded by repo id (here a folder renamed so, with nnsight's
    canonical-id lookup answered offline): nnsight's class, repo id, revision (and task)."""
    from nnsight.modeling import huggingface

    monkeypatch.setitem(huggingface._ID_CACHE, "org/tiny", "org/tiny")
    for folder, cls, extra in ((saved_clip[1], "nnsight.modeling.huggingface.HuggingFaceModel", {}),
                               (saved_vit[1], "nnsight.modeling.transformers.TransformersModel",
                                {"task": "image-classification"})):
        client = px.load(f"hf:{folder}", backend="nnsight", remote=True)
        client.repo_id = "org/tiny"  # as px.load("hf:org/tiny", ...) sets it
        assert client.to_model_key() == f"{cls}:{json.dumps({'repo_id': 'org/tiny', 'revision': None, **extra})}"


# ---------------------------------------------------------------- a server without prisma-ext
def server_for(client, expected_class: str, expected_key: dict):
    """The model an NDIF server builds from the client's key, built with prisma_ext hidden."""
    from nnsight.modeling.mixins.remotable import Remotable

    key = model_key(client, allow_folder=True)  # what to_model_key() sends, for a saved folder
    cls, suffix = key.split(":", 1)
    assert cls == expected_class and json.loads(suffix) == expected_key
    with prisma_ext_hidden():
        server = Remotable.from_model_key(key, dispatch=True)
    assert f"{type(server).__module__}.{type(server).__name__}" == expected_class
    return server


def assert_rebuilt_without_prisma_ext(worker: SubprocessServer, wire: type, nnsight_class: str) -> None:
    """The server process built nnsight's class, ran the wire envoy rebuilt from the request's
    source on nnsight's classes, never tried to import prisma_ext and holds none of it; the envoy
    carried no prisma-ext state."""
    report = worker.report
    assert report["server"] == nnsight_class
    assert report["envoy"][0] == f"{wire.__module__}.{wire.__name__}" and nnsight_class in report["envoy"]
    assert {c.rsplit(".", 1)[0] for c in report["envoy"]} - {"builtins"} <= {
        wire.__module__, "nnsight.modeling.huggingface", "nnsight.modeling.transformers",
        "nnsight.modeling.mixins.remotable", "nnsight.modeling.mixins.meta", "nnsight.modeling.mixins.loadable",
        "nnsight.intervention.envoy"}
    assert not [k for k in report["state"] if k.startswith("_px_") or k == "default_remote"]
    assert "_rs_sites" in report["state"]
    assert report["attempts"] == [] and report["prisma_modules"] == []


def test_a_server_without_prisma_ext_runs_a_clip_request(saved_clip, tmp_path):
    src, folder = saved_clip
    client = px.load(f"hf:{folder}", backend="nnsight", remote=True)
    nnsight_class = "nnsight.modeling.huggingface.HuggingFaceModel"
    key = model_key(client, allow_folder=True)  # what to_model_key() sends, for a saved folder
    assert key.split(":", 1)[0] == nnsight_class and json.loads(key.split(":", 1)[1]) == \
        {"repo_id": folder, "revision": None}
    worker = SubprocessServer(key, ("values", "logits"), tmp_path)
    inputs = clip_inputs(client)
    got = clip_values(client, inputs, backend=worker)
    assert_same(got, clip_values(px.load(src, backend="nnsight"), inputs), CLIP_READ + CLIP_LATER)
    assert_rebuilt_without_prisma_ext(worker, remote_envoy.RemoteSitesHF, nnsight_class)
    assert not client.dispatched and all(p.is_meta for p in client._module.parameters())  # no weights here
    print(f"CLIP request payload: {worker.payload:,} bytes")
    assert worker.payload < 200_000


def test_a_server_without_prisma_ext_runs_a_vit_request(saved_vit, tmp_path):
    src, folder = saved_vit
    client = px.load(f"hf:{folder}", backend="nnsight", remote=True)
    nnsight_class = "nnsight.modeling.transformers.TransformersModel"
    key = model_key(client, allow_folder=True)
    assert key.split(":", 1)[0] == nnsight_class and json.loads(key.split(":", 1)[1]) == \
        {"repo_id": folder, "revision": None, "task": "image-classification"}
    worker = SubprocessServer(key, ("values", "logits"), tmp_path)
    images = images_for(src)
    got = vit_values(client, images, backend=worker)
    assert_same(got, vit_values(px.load(src, backend="nnsight"), images), VIT_READ + VIT_LATER, atol=1e-6)
    assert_rebuilt_without_prisma_ext(worker, remote_envoy.RemoteSitesTransformers, nnsight_class)
    assert not client.dispatched
    print(f"ViT request payload: {worker.payload:,} bytes")
    assert worker.payload < 200_000


def test_in_process_servers_leave_everything_as_found(saved_clip):
    """The in-process stand-in (prisma_ext hidden while it builds, deserialises and runs) gives
    the same numbers and leaves the server's model, transformers and sys.meta_path as they were."""
    src, folder = saved_clip
    client = px.load(f"hf:{folder}", backend="nnsight", remote=True)
    server = server_for(client, "nnsight.modeling.huggingface.HuggingFaceModel", {"repo_id": folder, "revision": None})
    worker = HiddenServer(server, ("values", "logits"))
    inputs = clip_inputs(client)
    got = clip_values(client, inputs, backend=worker)
    assert_same(got, clip_values(px.load(src, backend="nnsight"), inputs), CLIP_READ + CLIP_LATER)
    assert worker.envoy_class.__name__ == "RemoteSitesHF" and worker.blocker.checked and not worker.blocker.attempts
    assert not [k for k in worker.envoy_state if k.startswith("_px_") or k == "default_remote"]
    plain = (str, bool, int, type(None))
    for entry in worker.envoy_state["_rs_sites"].values():
        assert all(isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(x, plain) for x in v))
                   for v in entry.values())
    assert_left_as_found(server._module)


def test_clip_embeddings_run_on_a_server_without_prisma_ext(saved_clip, monkeypatch):
    """encode_image / encode_text trace the source's own encoder; their bodies read only what the
    envoy carries (towers, sites, the result), so they run where prisma-ext is absent."""
    src, folder = saved_clip
    client = px.load(f"hf:{folder}", backend="nnsight", remote=True)
    server = server_for(client, "nnsight.modeling.huggingface.HuggingFaceModel", {"repo_id": folder, "revision": None})
    workers, trace = [], type(client).trace

    def on_the_server(self, *args, **kwargs):
        workers.append(HiddenServer(server, ("out",)))
        return trace(self, *args, backend=workers[-1], **kwargs)

    monkeypatch.setattr(type(client), "trace", on_the_server)
    local = px.load(src, backend="nnsight")
    inputs = clip_inputs(local)
    with torch.no_grad():
        torch.testing.assert_close(client.encode_image(inputs["pixel_values"]),
                                   local.encode_image(inputs["pixel_values"]), atol=0, rtol=0)
        torch.testing.assert_close(client.encode_text(inputs["input_ids"]), local.encode_text(inputs["input_ids"]),
                                   atol=0, rtol=0)
    assert len(workers) == 2 and all(w.blocker.checked and not w.blocker.attempts for w in workers)
    assert_left_as_found(server._module)


# ---------------------------------------------------------------- negative controls
def test_a_body_that_needs_prisma_ext_fails_where_it_is_absent(saved_clip):
    """`suggest` is prisma_ext code: the body that calls it is pickled by reference to it, so the
    hide refuses it (which shows the hide is real) and leaves everything as it was."""
    src, folder = saved_clip
    remote = px.load(f"hf:{folder}", backend="nnsight", remote="local")
    inputs = clip_inputs(remote)
    with local_simulation_hides_prisma_ext() as hides:
        with pytest.raises(ModuleNotFoundError, match="blocked prisma_ext"):
            with remote.trace(**inputs):
                suggest("visual.blocks.0.hook_resid_prex", remote.site_names, "site")
                remote.site("visual.blocks.0.hook_resid_pre").save()
    assert hides and hides[0].checked
    server = server_for(remote, "nnsight.modeling.huggingface.HuggingFaceModel", {"repo_id": folder, "revision": None})
    with pytest.raises(ModuleNotFoundError, match="blocked prisma_ext"):
        with remote.trace(**inputs, backend=HiddenServer(server, ())):
            suggest("visual.blocks.0.hook_resid_prex", remote.site_names, "site")
    assert_left_as_found(server._module)


def test_the_envoy_runs_only_because_its_modules_travel_by_value(saved_clip):
    """Unregistered, the envoy's class is pickled by reference (prisma_ext.traced.remote_envoy)
    and a server without prisma-ext cannot unpickle it."""
    import cloudpickle

    _, folder = saved_clip
    remote = px.load(f"hf:{folder}", backend="nnsight", remote="local")
    inputs = clip_inputs(remote)
    cloudpickle.unregister_pickle_by_value(remote_envoy)
    try:
        with local_simulation_hides_prisma_ext():
            with pytest.raises(ModuleNotFoundError, match="blocked prisma_ext"):
                with torch.no_grad(), remote.trace(**inputs):
                    remote.site("visual.blocks.0.hook_resid_pre").save()
    finally:
        remote_envoy.ship_by_value()
    assert_left_as_found(remote._module)


# ---------------------------------------------------------------- the plain site table
VIEWS = [spec.IDENTITY, spec.Heads(3), spec.Chunk(1, 3, 2), spec.SwapAxes(1, 2), spec.Half(1), spec.Unsqueeze(1),
         spec.TupleItem(0), spec.ConvTokens(), spec.FlattenGrid()]
RAW = {spec.View: (2, 5, 6), spec.Heads: (2, 5, 6), spec.Chunk: (2, 5, 12), spec.SwapAxes: (2, 3, 5, 4),
       spec.Half: (2, 5, 8), spec.Unsqueeze: (2, 6), spec.TupleItem: (2, 5, 6), spec.ConvTokens: (2, 6, 2, 3),
       spec.FlattenGrid: (2, 2, 3, 6)}


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: type(v).__name__)
def test_wire_views_read_and_write_as_the_site_map_views(view):
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(RAW[type(view)], generator=gen)
    if isinstance(view, spec.TupleItem):
        raw = (raw, torch.randn(2, generator=gen))
    plain = wire_view(view)
    read = remote_views.read_view(plain, raw)
    torch.testing.assert_close(read, view.read(raw), atol=0, rtol=0)
    edit = torch.randn(read.shape, generator=gen)
    torch.testing.assert_close(remote_views.write_view(plain, edit, raw), view.write(edit, raw), atol=0, rtol=0)


def test_sites_that_need_prisma_ext_in_the_forward_are_refused_by_name():
    class Scaled(spec.View):  # a view with no plain form
        pass

    table = wire_sites({
        "blocks.0.hook_resid_pre": spec.Site("blocks.0", "input"),
        "blocks.0.attn.hook_pattern": spec.Site("blocks.0.attn.attn_drop",
                                                prepare=spec.SetAttr("blocks.0.attn", "fused_attn", False)),
        "blocks.0.hook_odd": spec.Site("blocks.0", view=Scaled()),
        "blocks.0.attn.hook_q": spec.Site("blocks.0.attn", "qkv"),
    })
    assert table["blocks.0.hook_resid_pre"]["refused"] == ""
    assert "SetAttr" in table["blocks.0.attn.hook_pattern"]["refused"]
    assert "Scaled" in table["blocks.0.hook_odd"]["refused"]
    assert "'qkv'" in table["blocks.0.attn.hook_q"]["refused"]
    sites = remote_envoy.SiteTable()
    sites._rs_init(table, ("pixel_values", None))
    with pytest.raises(ValueError, match="blocks.0.attn.hook_pattern cannot run remotely: its prepare step"):
        sites._rs_lookup("blocks.0.attn.hook_pattern")
    with pytest.raises(remote_envoy.UnknownSiteError, match="closest: blocks.0.hook_resid_pre"):
        sites._rs_lookup("blocks.0.hook_resid_pr")
    assert sites.select_sites() == ["blocks.0.hook_resid_pre"] and len(sites.site_names) == 4


def test_the_analysis_methods_refuse_a_local_folder_before_sending(saved_clip, saved_vit):
    """The methods run remotely (tests/traced/test_remote_methods.py); a saved folder, which no
    server can rebuild, is refused by the first request before anything is sent."""
    from prisma_ext.analysis.backend import Backend
    from prisma_ext.errors import PrismaError

    clip = px.load(f"hf:{saved_clip[1]}", backend="nnsight", remote=True)
    with pytest.raises(PrismaError, match="is a local folder"):
        Backend.of(clip)
    vit = px.load(f"hf:{saved_vit[1]}", backend="nnsight", remote=True)
    with pytest.raises(PrismaError, match="is a local folder"):
        px.logit_lens(vit, images_for(saved_vit[0]))


def test_a_missing_api_key_is_named_before_anything_is_sent(saved_clip, monkeypatch):
    """remote=True with no NDIF key: a PrismaError saying how to set one, raised before nnsight
    builds a request (no network is touched: the key check comes first); a local folder is still
    refused as such first."""
    from nnsight import CONFIG

    from prisma_ext.errors import PrismaError
    from prisma_ext.traced import remote as remote_module

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    with pytest.raises(PrismaError, match="NDIF_API_KEY"):
        remote_module.check_api_key()
    client = px.load(f"hf:{saved_clip[1]}", backend="nnsight", remote=True)
    with pytest.raises(PrismaError, match="local folder"):
        with client.trace(pixel_values=torch.zeros(1, 3, 32, 32)):
            pass
    monkeypatch.setattr(client, "_remoteable_model_key", lambda: "{}")  # as if a repo id
    with pytest.raises(PrismaError, match="no NDIF API key"):
        with client.trace(pixel_values=torch.zeros(1, 3, 32, 32)):
            pass
    monkeypatch.setenv("NDIF_API_KEY", "x")
    remote_module.check_api_key()  # a key from the environment is enough
