"""The activation store: rows equal the model's own site values, token selections, resuming an
interrupted cache gives the same shards, mismatched or damaged folders are refused untouched."""

from __future__ import annotations

import json

import pytest
import torch

import prisma_ext as px
from prisma_ext.errors import InputError, UnknownNameError
from prisma_ext.sae import ActivationStore, cache_activations

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def images(model):
    return torch.randn(10, 3, *model.cfg.img_size, generator=torch.Generator().manual_seed(0))


class Flaky(torch.utils.data.Dataset):
    """(image, label) items; raises at `fail_at` (an interruption mid-cache)."""

    def __init__(self, images, fail_at=None):
        self.images, self.fail_at = images, fail_at

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt
        return self.images[i], 0


def test_rows_are_the_models_own_site_values(model, images, tmp_path):
    manifest = cache_activations(model, SITE, images, tmp_path / "all", images_per_shard=4, batch_size=3)
    assert [s["images"] for s in manifest["shards"]] == [[0, 4], [4, 8], [8, 10]] and manifest["complete"]
    _, cache = model.run_with_cache(images)
    want = cache[SITE]
    store = ActivationStore(tmp_path / "all")
    assert len(store) == 10 * model.cfg.layout.n_tokens and store.d_in == model.cfg.d_model
    for shard in store.shards():
        torch.testing.assert_close(shard["acts"], want[shard["image"], shard["token"]], atol=1e-5, rtol=0)
    batches = list(store.batches(100))
    assert all(len(b) == 100 for b in batches[:-1])
    torch.testing.assert_close(torch.cat(batches), torch.cat([s["acts"] for s in store.shards()]))


@pytest.mark.parametrize("tokens, per_image", [("cls", 1), ("patches", 64)])
def test_token_selections(model, images, tokens, per_image, tmp_path):
    cache_activations(model, SITE, images[:3], tmp_path / tokens, tokens=tokens)
    shard = next(ActivationStore(tmp_path / tokens).shards())
    assert shard["acts"].shape == (3 * per_image, model.cfg.d_model)
    first = 0 if tokens == "cls" else model.cfg.layout.n_prefix
    assert int(shard["token"].min()) == first and int(shard["image"].max()) == 2
    with pytest.raises(InputError, match="no register tokens"):
        cache_activations(model, SITE, images[:3], tmp_path / "reg", tokens="registers")


def test_an_interrupted_cache_resumes_to_the_same_shards(model, images, tmp_path):
    whole = cache_activations(model, SITE, images, tmp_path / "whole", images_per_shard=4)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, SITE, Flaky(images, fail_at=6), tmp_path / "resumed", images_per_shard=4)
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert not partial["complete"] and [s["images"] for s in partial["shards"]] == [[0, 4]]
    with pytest.raises(InputError, match="interrupted cache"):
        ActivationStore(tmp_path / "resumed")
    resumed = cache_activations(model, SITE, Flaky(images), tmp_path / "resumed", images_per_shard=4)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in whole["shards"]]
    names = [sorted(p.name for p in (tmp_path / f).iterdir()) for f in ("resumed", "whole")]
    assert names[0] == names[1]  # no stray temporary file


def test_the_nnsight_backend_stores_the_same_activations(model, images, tmp_path):
    traced = px.load("builtin:shapes-vit", backend="nnsight")
    cache_activations(model, SITE, images[:4], tmp_path / "tl")
    cache_activations(traced, SITE, images[:4], tmp_path / "nnsight")
    a, b = (next(ActivationStore(tmp_path / f).shards())["acts"] for f in ("tl", "nnsight"))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_mismatched_or_damaged_folders_are_refused_untouched(model, images, tmp_path):
    folder = tmp_path / "store"
    cache_activations(model, SITE, images[:4], folder, images_per_shard=2)
    manifest = (folder / "manifest.json").read_bytes()
    with pytest.raises(InputError, match="site='blocks.1.hook_resid_post'"):
        cache_activations(model, "blocks.0.hook_resid_post", images[:4], folder, images_per_shard=2)
    assert (folder / "manifest.json").read_bytes() == manifest
    with pytest.raises(UnknownNameError, match="closest"):
        cache_activations(model, "blocks.1.hook_resid_postt", images[:4], tmp_path / "other")
    shard = folder / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)  # damaged
    with pytest.raises(InputError, match="corrupted"):
        ActivationStore(folder)
    with pytest.raises(InputError, match="does not match its checksum"):
        cache_activations(model, SITE, images[:4], folder, images_per_shard=2)
    with pytest.raises(InputError, match="tokens must be one of"):
        cache_activations(model, SITE, images[:4], tmp_path / "x", tokens="cls_only")
