"""Real checkpoint layouts: a shrunk DINOv3, EVA-02, SigLIP 2 and AIMv2 saved the way timm
publishes its pretrained weights (a `model.safetensors` of the model's state dict, the file the
hub serves) or as a plain `.pth`, then loaded back by path through px.load's named timm source
(timm's own pretrained-loading path, with its checkpoint filter) and compared with the model
that was saved. The Hugging Face `save_pretrained` folders of the same families are covered in
test_hf_dino.py and test_hf_siglip.py (`hf:FOLDER`)."""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from tests.support.models import randomize_

# name (a timm pretrained tag where timm publishes one), shrink arguments
CHECKPOINTS = {
    "vit_small_patch16_dinov3.lvd1689m": dict(depth=2, embed_dim=32, num_heads=2, img_size=32),
    "eva02_tiny_patch14_224.mim_in22k": dict(depth=2, embed_dim=32, num_heads=2, img_size=28),
    "vit_base_patch16_siglip_224.v2_webli": dict(depth=2, embed_dim=32, num_heads=2, img_size=32),
    "aimv2_large_patch14_224.apple_pt": dict(depth=2, embed_dim=32, num_heads=2, img_size=28),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_a_saved_checkpoint_loads_by_path_and_matches(name, suffix, tmp_path):
    import timm

    shrink = CHECKPOINTS[name]
    src = randomize_(timm.create_model(name, pretrained=False, **shrink).eval(), seed=len(name))
    path = tmp_path / f"model{suffix}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = px.load(f"timm:{name}", pretrained=path, **shrink)
    images = torch.randn(2, 3, shrink["img_size"], shrink["img_size"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = src(images)
        torch.testing.assert_close(loaded(images), want, atol=1e-4, rtol=1e-4)
    assert loaded.cfg.source == f"timm:{name}"
    fresh = px.load(f"timm:{name}", pretrained=False, **shrink)  # the weights did come from the file
    with torch.no_grad():
        assert (fresh(images) - want).abs().max() > 1e-3
