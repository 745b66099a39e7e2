"""TopK training: recovers a planted sparse dictionary, is seeded, tracks dead latents, and a run
interrupted after a checkpoint resumes to the same SAE as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from prisma_ext.errors import InputError
from prisma_ext.sae import train as train_module
from prisma_ext.sae.train import evaluate, train_topk


def planted(rows=4096, d_in=16, atoms=48, active=3, seed=0):
    """Rows that are sums of `active` of `atoms` unit directions with positive weights."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d_in, generator=gen)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    codes = torch.zeros(rows, atoms)
    which = torch.rand(rows, atoms, generator=gen).argsort(-1)[:, :active]
    codes.scatter_(1, which, torch.rand(rows, active, generator=gen) + 0.5)
    return codes @ dictionary + 0.5, dictionary


def test_a_planted_sparse_dictionary_is_recovered():
    data, dictionary = planted()
    sae, log = train_topk(data, d_sae=64, k=3, epochs=25, batch_size=256, lr=3e-3, seed=0)
    # 48 atoms in 16 dimensions: a linear encoder's limit is about 0.89 even with every atom found
    assert log["explained_variance"] > 0.85, log["explained_variance"]
    assert log["l0"] <= 3 and log["loss"][-1] < log["loss"][0] / 3
    # most planted directions have a decoder row close to them
    cosine = (dictionary @ sae.W_dec.detach().T).max(-1).values
    assert float((cosine > 0.9).float().mean()) > 0.9
    untrained = evaluate(type(sae)(16, 64, "topk", 3), data)
    assert untrained["explained_variance"] < 0.5  # the measure is not trivially high


def test_training_is_seeded():
    data, _ = planted(rows=1024)
    a, _ = train_topk(data, d_sae=32, k=3, epochs=2, batch_size=128, seed=1)
    b, _ = train_topk(data, d_sae=32, k=3, epochs=2, batch_size=128, seed=1)
    c, _ = train_topk(data, d_sae=32, k=3, epochs=2, batch_size=128, seed=2)
    torch.testing.assert_close(a.W_dec, b.W_dec, atol=0, rtol=0)
    assert not torch.equal(a.W_dec, c.W_dec)


def test_an_interrupted_run_resumes_to_the_same_sae(tmp_path, monkeypatch):
    data, _ = planted(rows=1024)
    settings = dict(d_sae=32, k=3, epochs=3, batch_size=128, seed=0, checkpoint_every=5)
    whole, whole_log = train_topk(data, **settings, checkpoint=tmp_path / "whole")
    calls = {"n": 0}
    real = train_module._aux_loss

    def interrupt_at_step_13(*args):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_module, "_aux_loss", interrupt_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train_topk(data, **settings, checkpoint=tmp_path / "resumed")
    monkeypatch.setattr(train_module, "_aux_loss", real)
    saved = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
    assert saved["step"] == 10  # the last checkpoint before the interruption
    resumed, log = train_topk(data, **settings, checkpoint=tmp_path / "resumed")
    for name, p in whole.named_parameters():
        torch.testing.assert_close(dict(resumed.named_parameters())[name], p, atol=1e-6, rtol=0, msg=name)
    assert len(log["loss"]) == len(whole_log["loss"]) == 24
    with pytest.raises(InputError, match="other settings"):
        train_topk(data, **(settings | {"k": 4}), checkpoint=tmp_path / "resumed")


def test_dead_latents_are_counted_and_bad_input_refused():
    data, _ = planted(rows=512)
    sae, log = train_topk(data, d_sae=256, k=1, epochs=1, batch_size=128, seed=0)
    assert 0 < log["dead_fraction"] < 1
    with pytest.raises(InputError, match="fewer than one batch"):
        train_topk(data[:10], d_sae=8, k=1, batch_size=128)
    with pytest.raises(InputError, match="ActivationStore or activations"):
        train_topk([1, 2, 3], d_sae=8, k=1)
