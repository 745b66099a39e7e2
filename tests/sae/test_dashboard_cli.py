"""The latent dashboard (a self-contained page whose figures are the latents asked for) and the
`prisma-ext sae` commands end to end on a small store, with bad input as one error line."""

from __future__ import annotations

import json
import re

import pytest
import torch

from prisma_ext import zoo
from prisma_ext.cli import main
from prisma_ext.errors import InputError
from prisma_ext.sae import SparseAutoencoder
from prisma_ext.sae.dashboard import build_dashboard, pick_latents, sae_dashboard

SITE = "blocks.2.hook_resid_post"


def test_pick_latents_skips_dead_and_dense_latents_and_ranks_by_strength():
    peaks = torch.zeros(100, 5)
    peaks[:, 0] = 1.0  # dense: fires on every image
    peaks[:10, 1] = 2.0  # 10%, strong
    peaks[:10, 2] = 0.5  # 10%, weak
    peaks[:1, 4] = 9.0  # 1%, strongest
    assert pick_latents(peaks, 3) == [4, 1, 2]  # latent 3 is dead, latent 0 dense


def test_the_dashboard_shows_the_latents_asked_for(model, tmp_path):
    images = zoo.normalize(zoo.heldout("shapes-vit", n=16, seed=4).images, "shapes-vit")
    sae = SparseAutoencoder(model.cfg.d_model, 64, "topk", 4)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    page = build_dashboard(model, sae, SITE, images, latents=[3, 9], names={3: "a name"}, n_top=4)
    anchors = [a for a, _ in page.toc]
    assert anchors == ["overview", "latent-3", "latent-9", "summary"]
    out = sae_dashboard(model, sae, SITE, images, tmp_path / "latents.html", n_latents=2)  # chosen: they fire
    text = out.read_text(encoding="utf-8")
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="https?:', text)  # plotly inlined, nothing fetched
    chosen = [int(i) for i in re.findall(r'<section id="latent-(\d+)"', text)]
    titles = " | ".join(re.findall(r'"title":\{"text":"([^"]+)"', text))
    assert len(chosen) == 2
    for latent in chosen:
        for part in ("its top images", "its non-zero activations", "direct effect on the class logits",
                     "ablating it on its top images"):
            assert f"latent {latent}: {part}" in titles
    with pytest.raises(InputError, match="an .html file"):
        sae_dashboard(model, sae, SITE, images, tmp_path / "latents.png")
    with pytest.raises(InputError, match="N >= 2"):
        sae_dashboard(model, sae, SITE, images[:1], tmp_path / "one.html")
    assert not (tmp_path / "one.html").exists()


def test_the_sae_commands_cache_train_evaluate_and_report(tmp_path, capsys):
    store, folder, page = tmp_path / "acts", tmp_path / "sae", tmp_path / "latents.html"
    common = ["--n", "24", "-q"]
    assert main(["sae", "cache", "--model", "builtin:shapes-vit", "--site", SITE, "--out", str(store), *common]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["model"] == "builtin:shapes-vit" and manifest["n_images"] == 24
    assert main(["sae", "train", "--store", str(store), "--out", str(folder), "--d-sae", "64", "--k", "4",
                 "--batch-size", "128", "-q"]) == 0
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == SITE and cfg["metadata"]["model_name"] == "builtin:shapes-vit"
    capsys.readouterr()
    assert main(["sae", "eval", "--sae", str(folder), *common]) == 0
    printed = capsys.readouterr().out
    assert "explained_variance" in printed and "kl_recovered" in printed and "accuracy_recovered" in printed
    assert main(["sae", "report", "--sae", str(folder), "--out", str(page), "--latents", "0", "1", *common]) == 0
    assert 'id="latent-0"' in page.read_text(encoding="utf-8")
    # bad input: one line, status 2, nothing replaced
    weights = (folder / "sae_weights.safetensors").read_bytes()
    assert main(["sae", "train", "--store", str(store), "--out", str(folder), "--d-sae", "64", "--k", "4", "-q"]) == 2
    assert "already holds an SAE; pass --overwrite" in capsys.readouterr().err
    assert (folder / "sae_weights.safetensors").read_bytes() == weights
    assert main(["sae", "eval", "--sae", str(tmp_path / "missing"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prisma-ext: error:") and err.count("\n") == 1
    assert main(["sae", "cache", "--model", "builtin:shapes-vit", "--site", "blocks.2.hook_resid_pots", "--out",
                 str(tmp_path / "x"), *common]) == 2
    assert "blocks.2.hook_resid_post" in capsys.readouterr().err  # the closest name
