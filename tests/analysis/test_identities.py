"""Each method checks the identity it rests on, on every call, and raises instead of returning
numbers that disagree with the model: the lens's last layer is the output, DLA's components sum to
the score, patching every token gives the source run."""

from __future__ import annotations

import pytest
import torch

import prisma_ext as px
from prisma_ext.analysis.backend import TLBackend
from prisma_ext.errors import IdentityError
from tests.support.models import images_for, small_timm


def gelu_after_pooling(value, hook):
    """What a user did to put a GELU between the pooled token and the head: a hook."""
    return torch.nn.functional.gelu(value)


def test_a_hook_between_the_pool_and_the_head_is_caught():
    src = small_timm("plain", seed=2)
    model, images = px.load(src), images_for(src, batch=3)
    model.add_hook("hook_pooled", gelu_after_pooling, is_permanent=True)
    try:
        with pytest.raises(IdentityError, match="logit_lens: the readout of the last layer differs"):
            px.logit_lens(model, images)
        with pytest.raises(IdentityError, match="direct_logit_attribution: the components sum to"):
            px.direct_logit_attribution(model, images)
        # patching runs the hook like the model does, so its identity holds and it runs
        sweep = px.activation_patching(model, images[:1], images[1:2], px.LogitDiff(0, 1), sites="resid_pre",
                                       layers=[1], progress=False)
        assert sweep["resid_pre"].values.shape == (1, 1, model.layout.n_tokens)
    finally:
        model.reset_hooks(including_permanent=True)
    px.logit_lens(model, images)  # without the hook: fine
    px.direct_logit_attribution(model, images)


def test_a_broken_restart_is_caught(monkeypatch):
    """The mutation the patching identity must catch: a restart that drops the last block."""
    src = small_timm("dinov2_reg4", seed=2)
    model, images = px.load(src), images_for(src, batch=2)

    def skips_the_last_block(self, resid, layer, rows, readout_only):
        return self.vit.run_from(resid, min(layer + 1, len(self.vit.blocks)), self.return_type)

    before = px.activation_patching(model, images[:1], images[1:], px.LogitDiff(0, 1), sites="mlp_out", layers=[1],
                                    progress=False)
    monkeypatch.setattr(TLBackend, "_continue", skips_the_last_block)
    with pytest.raises(IdentityError, match=r"patching every token of blocks\.1\.hook_resid_pre"):  # layer 1
        px.activation_patching(model, images[:1], images[1:], px.LogitDiff(0, 1), sites="mlp_out", layers=[1],
                               progress=False)
    assert before["mlp_out"].values.shape == (1, 1, model.layout.n_tokens)


def test_identities_hold_on_every_linear_layout_and_both_backends():
    for variant in ("plain", "deit_distilled", "dinov2_reg4", "gap_no_cls", "avg_fc_norm", "clip_norm_pre"):
        src = small_timm(variant, seed=4)
        images = images_for(src, batch=2)
        for model in (px.load(src), px.load(src, backend="nnsight"), px.load(src, fold_ln=True,
                                                                             center_writing_weights=True)):
            px.logit_lens(model, images)
            dla = px.direct_logit_attribution(model, images, by=("layer", "head", "source"))
            torch.testing.assert_close(dla.values.sum(-1), dla.meta["score"], atol=1e-4, rtol=1e-4)
            px.activation_patching(model, images[:1], images[1:], px.LogitDiff(0, 1), sites="z", layers=[0],
                                   progress=False)
