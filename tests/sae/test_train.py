"""TopK training: recovers a planted sparse dictionary, is seeded, tracks dead latents, and a run
interrupted after a checkpoint resumes to the same SAE as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from prisma_ext.errors import InputError
from prisma_ext.sae import SparseAutoencoder
from prisma_ext.sae.objectives import Objective
from prisma_ext.sae.train import evaluate, train_sae, train_topk


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


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_an_interrupted_run_resumes_to_the_same_sae(tmp_path, monkeypatch, architecture):
    data, _ = planted(rows=1024)
    k = None if architecture == "jumprelu" else 3
    settings = dict(d_sae=32, architecture=architecture, k=k, epochs=3, batch_size=128, seed=0, checkpoint_every=5)
    whole, whole_log = train_sae(data, **settings, checkpoint=tmp_path / "whole")
    calls = {"n": 0}
    real = Objective.loss

    def interrupt_at_step_13(self, *args):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(Objective, "loss", interrupt_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train_sae(data, **settings, checkpoint=tmp_path / "resumed")
    monkeypatch.setattr(Objective, "loss", real)
    saved = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
    assert saved["step"] == 10  # the last checkpoint before the interruption
    resumed, log = train_sae(data, **settings, checkpoint=tmp_path / "resumed")
    for name, p in whole.named_parameters():  # the threshold too (BatchTopK's running mean, JumpReLU's)
        torch.testing.assert_close(dict(resumed.named_parameters())[name], p, atol=1e-6, rtol=0, msg=name)
    assert len(log["loss"]) == len(whole_log["loss"]) == 24
    with pytest.raises(InputError, match="other settings"):
        train_sae(data, **(settings | {"lr": 1e-3}), checkpoint=tmp_path / "resumed")


def test_dead_latents_are_counted_and_bad_input_refused():
    data, _ = planted(rows=512)
    sae, log = train_topk(data, d_sae=256, k=1, epochs=1, batch_size=128, seed=0)
    assert 0 < log["dead_fraction"] < 1
    with pytest.raises(InputError, match="fewer than one batch"):
        train_topk(data[:10], d_sae=8, k=1, batch_size=128)
    with pytest.raises(InputError, match="ActivationStore or activations"):
        train_topk([1, 2, 3], d_sae=8, k=1)


@pytest.mark.parametrize("architecture, options", [("batchtopk", {"k": 3}),
                                                   ("jumprelu", {"l0_coefficient": 0.03, "threshold_init": 1.0})])
def test_batchtopk_and_jumprelu_recover_the_planted_dictionary(architecture, options):
    data, dictionary = planted()
    sae, log = train_sae(data, d_sae=64, architecture=architecture, epochs=25, batch_size=256, lr=3e-3, seed=0,
                         **options)
    assert sae.architecture == "jumprelu"  # BatchTopK's inference form is a JumpReLU, as SAELens saves it
    assert log["explained_variance"] > 0.8, log
    assert 2 <= log["l0"] <= 4, log  # BatchTopK: the averaged threshold keeps about k latents per row
    cosine = (dictionary @ sae.W_dec.detach().T).max(-1).values
    assert float((cosine > 0.9).float().mean()) > 0.9
    assert torch.equal(sae.encode(data) > 0, (sae.encode_pre(data) > sae.threshold) & (sae.encode_pre(data) > 0))


@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu"])
def test_training_does_not_depend_on_the_data_scale(architecture):
    """The same run on data x 10 gives the same SAE with its biases and threshold x 10 (so the
    scale used while training is folded back into the SAE, on the raw data's scale)."""
    data, _ = planted(rows=1024)
    k = 3 if architecture == "batchtopk" else None
    a, log_a = train_sae(data, d_sae=32, architecture=architecture, k=k, epochs=2, batch_size=128, seed=0)
    b, log_b = train_sae(data * 10, d_sae=32, architecture=architecture, k=k, epochs=2, batch_size=128, seed=0)
    for name in ("W_enc", "W_dec"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-4, rtol=1e-4)
    for name in ("b_enc", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(b, name), 10 * getattr(a, name), atol=1e-3, rtol=1e-4)
    assert abs(log_a["explained_variance"] - log_b["explained_variance"]) < 1e-4
    torch.testing.assert_close(b.decode(b.encode(data[:8] * 10)), 10 * a.decode(a.encode(data[:8])), atol=1e-3,
                               rtol=1e-4)


def test_matryoshka_prefixes_make_the_first_latents_reconstruct_alone():
    data, _ = planted()

    @torch.no_grad()
    def prefix_explained(sae, m=12):
        acts = sae.encode(data)
        recon = acts[:, :m] @ sae.W_dec[:m] + sae.b_dec
        return float(1 - (data - recon).pow(2).sum() / (data - data.mean(0)).pow(2).sum())

    common = dict(d_sae=64, architecture="batchtopk", k=3, epochs=10, batch_size=256, lr=3e-3, seed=0)
    nested, log = train_sae(data, prefixes=[12], **common)
    plain, _ = train_sae(data, **common)
    assert prefix_explained(nested) > prefix_explained(plain) + 0.1, (prefix_explained(nested), prefix_explained(plain))
    assert log["explained_variance"] > 0.7


def test_bad_training_settings_are_refused_by_name():
    data, _ = planted(rows=512)
    with pytest.raises(InputError, match="cannot be trained here; trainable: topk, batchtopk, jumprelu"):
        train_sae(data, d_sae=8, architecture="gated")
    with pytest.raises(InputError, match="needs k"):
        train_sae(data, d_sae=8, architecture="batchtopk")
    with pytest.raises(InputError, match="takes no k"):
        train_sae(data, d_sae=8, architecture="jumprelu", k=2)
    with pytest.raises(InputError, match="prefixes are for topk and batchtopk"):
        train_sae(data, d_sae=8, architecture="jumprelu", prefixes=[4])
    with pytest.raises(InputError, match=r"prefixes must be ints in \[1, d_sae=8\]"):
        train_sae(data, d_sae=8, architecture="topk", k=2, prefixes=[16])
    assert isinstance(train_topk(data, d_sae=8, k=2, batch_size=128)[0], SparseAutoencoder)


def test_auxk_on_the_dead_columns_equals_the_dense_definition():
    """AuxK computed on the dead latents' columns only = over every latent with the live ones
    masked out (values and gradients), and zero without dead latents."""
    from prisma_ext.sae.objectives import aux_loss

    gen = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(12, 40, "topk", 4)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(40, 12, generator=gen))
    pre = torch.randn(32, 40, generator=gen, requires_grad=True)
    error = torch.randn(32, 12, generator=gen)
    dead = torch.rand(40, generator=gen) < 0.3
    masked = torch.where(dead, pre, torch.full_like(pre, float("-inf")))
    top = masked.topk(5, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    dense = ((acts @ sae.W_dec - error).pow(2).sum(-1).mean() / error.pow(2).sum(-1).mean())
    ours = aux_loss(sae, pre, error, dead, 5)
    torch.testing.assert_close(ours, dense)
    for a, b in zip(torch.autograd.grad(ours, [pre, sae.W_dec]), torch.autograd.grad(dense, [pre, sae.W_dec])):
        torch.testing.assert_close(a, b)
    assert float(aux_loss(sae, pre, error, torch.zeros(40, dtype=torch.bool), 5)) == 0
