"""The nnsight backend: the original timm module traced by nnsight, read by TL site names.

Sites equal HookedViT's, edits are real and equal TL's edits, several invokes batch, gradients
equal plain autograd, and nothing is left on the user's module after a trace.
"""

import subprocess
import sys

import pytest
import torch
from nnsight import save

import prisma_ext as px
from prisma_ext.errors import InputError, PrismaError, UnknownNameError
from tests.support.models import VARIANTS, fused_flags, images_for, module_hooks, small_timm
from tests.support.patcher import reference_patch

ATOL = 1e-5


def load_both(variant, seed=0, **overrides):
    src = small_timm(variant, seed=seed, **overrides)
    return src, px.load(src), px.load(src, backend="nnsight")


# ---------------------------------------------------------------- reading sites
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_site_equals_the_tl_backend(variant):
    src, hooked, traced = load_both(variant)
    x = images_for(src)
    with torch.no_grad():
        ref = src(x)
        tl_out, tl_cache = hooked.run_with_cache(x)
        out, cache = traced.run_with_cache(x)
    assert len(cache) == len(traced.site_names) >= 15 * len(src.blocks)
    for name, value in cache.items():
        torch.testing.assert_close(value, tl_cache[name], atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, tl_out, atol=ATOL, rtol=0)
    assert traced.layout == hooked.layout


def test_dynamic_image_size_sites():
    src, hooked, traced = load_both("dinov2_reg4", dynamic_img_size=True)
    x = images_for(src, size=(56, 28))
    names = ["hook_patch_embed", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern",
             "blocks.1.attn.hook_k", "ln_final.hook_normalized"]
    with torch.no_grad():
        _, tl_cache = hooked.run_with_cache(x, names_filter=names)
        out, cache = traced.run_with_cache(x, names)
        ref = src(x)
    assert cache["hook_patch_embed"].shape == (2, 8, src.embed_dim)
    for name in names:
        torch.testing.assert_close(cache[name], tl_cache[name], atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_site_names_layout_and_nnsight_tree():
    src, hooked, traced = load_both("deit_distilled")
    shapes, tl_shapes = traced.site_shapes(batch_size=3), hooked.site_shapes(batch_size=3)
    assert list(shapes) == traced.site_names
    assert all(shapes[name] == tl_shapes[name] for name in shapes)
    assert traced.layout.prefix_names == ("cls", "dist")
    assert traced.site_names[0] == "hook_patch_embed"
    assert traced.site_names.index("blocks.0.hook_resid_mid") < traced.site_names.index(
        "blocks.0.hook_resid_post") < traced.site_names.index("blocks.1.hook_resid_pre")
    assert "hook_pooled" not in traced.site_names  # a distilled head reads two tokens apart
    assert traced.sites["blocks.1.attn.hook_z"].module == "blocks.1.attn.proj"
    x = images_for(src)
    with torch.no_grad():
        with traced.trace(x):
            raw = traced.blocks[1].attn.qkv.output.save()  # nnsight's own tree works too
            q = traced.site("blocks.1.attn.hook_q").save()
    torch.testing.assert_close(q, raw.view(2, raw.shape[1], 3, 3, -1)[:, :, 0], atol=0, rtol=0)


# ---------------------------------------------------------------- edits are real
EDITS = ["hook_patch_embed", "hook_embed", "hook_full_embed", "blocks.0.hook_resid_pre",
         "blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k",
         "blocks.1.attn.hook_v", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_z",
         "blocks.0.hook_attn_out", "blocks.1.hook_resid_mid", "blocks.1.ln2.hook_normalized",
         "blocks.0.mlp.hook_pre", "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out",
         "blocks.1.hook_resid_post", "ln_final.hook_normalized", "hook_pooled"]


def edit(name, t):
    if name.endswith("hook_pattern"):
        return torch.full_like(t, 1.0 / t.shape[-1])  # uniform attention
    scale = torch.linspace(0.5, 2.0, t.shape[-1])
    return t * scale - 0.1


@pytest.mark.parametrize("how", ["set_site", "in_place"])
@pytest.mark.parametrize("name", EDITS)
def test_editing_a_site_equals_the_same_tl_edit(name, how):
    variant = "clip_norm_pre" if "embed" in name else "dinov2_reg4"
    src, hooked, traced = load_both(variant, seed=3)
    x = images_for(src, seed=4)
    with torch.no_grad():
        clean = src(x)
        tl_edited = hooked.run_with_hooks(x, fwd_hooks=[(name, lambda t, hook: edit(name, t))])
        with traced.trace(x):
            if how == "set_site":
                traced.set_site(name, edit(name, traced.site(name)))
            else:
                value = traced.site(name)
                value[...] = edit(name, value)
            edited = traced.output.save()
    assert (tl_edited - clean).abs().max() > 1e-3, "the edit must matter"
    torch.testing.assert_close(edited, tl_edited, atol=1e-4, rtol=0)


def test_set_site_broadcasts_and_checks_shapes():
    src, _, traced = load_both("plain")
    x = images_for(src)
    direction = torch.randn(src.embed_dim)
    with torch.no_grad():
        with traced.trace(x):
            traced.set_site("blocks.0.hook_resid_post", direction)  # every token
            out = traced.output.save()
        stash = []

        def replace(mod, args, output):
            stash.append(1)
            return direction.expand_as(output).clone()

        handle = src.blocks[0].register_forward_hook(replace)
        try:
            ref = src(x)
        finally:
            handle.remove()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    with pytest.raises(InputError, match=r"\[batch, pos, d_model\]"):
        with traced.trace(x):
            traced.set_site("blocks.0.hook_resid_post", torch.zeros(5, 7))


def test_set_site_with_tokens_change_takes_another_token_count():
    """tokens_change=True: an appended token reaches the next block (equal to the same append done
    with a torch hook); without it the same value is refused; only axis 1 may change."""
    src, _, traced = load_both("plain")
    x = images_for(src)
    with torch.no_grad():
        with traced.trace(x):
            resid = traced.site("blocks.0.hook_resid_post")
            longer = torch.cat([resid, resid[:, :1] * 2], 1)
            traced.set_site("blocks.0.hook_resid_post", longer, tokens_change=True)
            seen = traced.site("blocks.1.hook_resid_post").save()
        handle = src.blocks[0].register_forward_hook(lambda mod, args, out: torch.cat([out, out[:, :1] * 2], 1))
        try:
            want = src.blocks[1](src.blocks[0](src.norm_pre(src._pos_embed(src.patch_embed(x)))))
        finally:
            handle.remove()
    assert seen.shape[1] == want.shape[1] == src.patch_embed.num_patches + 2
    torch.testing.assert_close(seen, want, atol=ATOL, rtol=0)
    with pytest.raises(InputError, match="here, got"):
        with traced.trace(x):
            resid = traced.site("blocks.0.hook_resid_post")
            traced.set_site("blocks.0.hook_resid_post", torch.cat([resid, resid[:, :1]], 1))
    with pytest.raises(InputError, match="only axis 1"):
        with traced.trace(x):
            resid = traced.site("blocks.0.hook_resid_post")
            traced.set_site("blocks.0.hook_resid_post", resid[..., :-1], tokens_change=True)


# ---------------------------------------------------------------- several invokes
def test_clean_corrupted_patching_equals_torch_hooks():
    src = small_timm("dinov2_reg4", seed=5)
    clean, corrupt = images_for(src, seed=1), images_for(src, seed=2)
    positions = [0, 3, 6, 9]
    traced = px.load(src, backend="nnsight")
    with torch.no_grad():
        with traced.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(clean):
                source = traced.site("blocks.1.hook_resid_pre")
                barrier()
                clean_out = traced.output.save()
            with tracer.invoke(corrupt):
                barrier()
                target = traced.site("blocks.1.hook_resid_pre")
                target[:, positions] = source[:, positions]
                patched = traced.output.save()

        ref_clean, ref_patched = reference_patch(src.blocks[1], lambda: src(clean), lambda: src(corrupt), positions,
                                                 port="input")
        corrupt_out = src(corrupt)
    assert (ref_patched - corrupt_out).abs().max() > 1e-3
    torch.testing.assert_close(clean_out, ref_clean, atol=ATOL, rtol=0)
    torch.testing.assert_close(patched, ref_patched, atol=ATOL, rtol=0)
    assert not module_hooks(src)


def test_patching_a_head_across_invokes_equals_tl():
    src, hooked, traced = load_both("plain", seed=6)
    clean, corrupt = images_for(src, seed=1), images_for(src, seed=2)
    name, head = "blocks.0.attn.hook_z", 1
    with torch.no_grad():
        with traced.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(clean):
                z_clean = traced.site(name)
                barrier()
            with tracer.invoke(corrupt):
                barrier()
                z = traced.site(name).clone()
                z[:, :, head] = z_clean[:, :, head]
                traced.set_site(name, z)
                patched = traced.output.save()
        _, cache = hooked.run_with_cache(clean, names_filter=name)

        def put(t, hook):
            t = t.clone()
            t[:, :, head] = cache[name][:, :, head]
            return t

        ref = hooked.run_with_hooks(corrupt, fwd_hooks=[(name, put)])
    torch.testing.assert_close(patched, ref, atol=1e-4, rtol=0)


def test_invokes_of_different_batch_sizes_see_their_own_rows():
    src, _, traced = load_both("gap_no_cls")
    a, b = images_for(src, batch=1, seed=1), images_for(src, batch=3, seed=2)
    with torch.no_grad():
        with traced.trace() as tracer:
            with tracer.invoke(a):
                resid_a = traced.site("blocks.1.hook_resid_post").save()
                out_a = traced.output.save()
            with tracer.invoke(b):
                out_b = traced.output.save()
        ref_a, ref_b = src(a), src(b)
    assert resid_a.shape[0] == 1 and out_b.shape[0] == 3
    torch.testing.assert_close(out_a, ref_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_b, ref_b, atol=ATOL, rtol=0)


def test_mismatched_invokes_are_refused():
    src, _, traced = load_both("plain", dynamic_img_size=True)
    with pytest.raises(InputError, match="only the batch size may differ"):
        with traced.trace() as tracer:
            with tracer.invoke(images_for(src, size=(32, 32))):
                traced.output.save()
            with tracer.invoke(images_for(src, size=(16, 24))):
                traced.output.save()


# ---------------------------------------------------------------- gradients
GRAD_SITES = ["hook_embed", "blocks.0.attn.hook_q", "blocks.0.attn.hook_v", "blocks.0.attn.hook_pattern",
              "blocks.0.attn.hook_z", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid",
              "blocks.1.mlp.hook_post", "ln_final.hook_normalized"]


def reference_grads(src, x, cls):
    """Gradients of logit `cls` at the same places, by plain torch hooks and autograd."""
    b0, b1 = src.blocks[0], src.blocks[1]
    n, heads = x.shape[0], b0.attn.num_heads
    kept, handles = {}, []

    def out(name):
        def hook(module, args, output):
            output.retain_grad()
            kept[name] = output
        return hook

    def inp(name):
        def hook(module, args):
            args[0].retain_grad()
            kept[name] = args[0]
        return hook

    handles += [src.norm_pre.register_forward_hook(out("hook_embed")),
                b0.attn.qkv.register_forward_hook(out("qkv")),
                b0.attn.attn_drop.register_forward_hook(out("blocks.0.attn.hook_pattern")),
                b0.attn.proj.register_forward_pre_hook(inp("z")),
                b1.register_forward_pre_hook(inp("blocks.1.hook_resid_pre")),
                b1.norm2.register_forward_pre_hook(inp("blocks.1.hook_resid_mid")),
                b1.mlp.act.register_forward_hook(out("blocks.1.mlp.hook_post")),
                src.fc_norm.register_forward_hook(out("fc_norm"))]
    was = b0.attn.fused_attn
    b0.attn.fused_attn = False
    try:
        src(x)[:, cls].sum().backward()
    finally:
        b0.attn.fused_attn = was
        for h in handles:
            h.remove()
    src.zero_grad(set_to_none=True)
    grads = {k: v.grad for k, v in kept.items()}
    qkv = grads.pop("qkv").view(n, -1, 3, heads, b0.attn.head_dim)
    grads["blocks.0.attn.hook_q"], grads["blocks.0.attn.hook_v"] = qkv[:, :, 0], qkv[:, :, 2]
    grads["blocks.0.attn.hook_z"] = grads.pop("z").view(n, -1, heads, b0.attn.head_dim)
    grads["ln_final.hook_normalized"] = grads.pop("fc_norm").unsqueeze(1)
    return grads


def test_gradients_at_sites_equal_autograd():
    src = small_timm("clip_norm_pre", seed=9, global_pool="avg", fc_norm=True)
    x = images_for(src, seed=10)
    cls = 3
    expected = reference_grads(src, x, cls)
    traced = px.load(src, backend="nnsight")
    with traced.trace(x):
        acts = [traced.site(name) for name in GRAD_SITES]
        loss = traced.output[:, cls].sum()
        with loss.backward():
            grads = save([act.grad for act in reversed(acts)])
    got = dict(zip(reversed(GRAD_SITES), grads))
    for name in GRAD_SITES:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not module_hooks(src)


def test_gradients_inside_a_batched_invoke():
    src, _, traced = load_both("plain", seed=2)
    a, b = images_for(src, seed=1), images_for(src, seed=2)
    with traced.trace() as tracer:
        with tracer.invoke(a):
            traced.output.save()
        with tracer.invoke(b):
            z = traced.site("blocks.1.attn.hook_z")
            resid = traced.site("blocks.1.hook_resid_mid")
            loss = traced.output[:, 0].sum()
            with loss.backward():
                g_resid = resid.grad.save()
                g_z = z.grad.save()
    kept = {}

    def keep(key):
        def hook(module, args):
            args[0].retain_grad()
            kept[key] = args[0]
        return hook

    hooks = [src.blocks[1].attn.proj.register_forward_pre_hook(keep("z")),
             src.blocks[1].norm2.register_forward_pre_hook(keep("r"))]
    try:
        src(b)[:, 0].sum().backward()
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(g_resid, kept["r"].grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_z, kept["z"].grad.view_as(g_z), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- nothing left behind
def test_module_is_left_as_it_was():
    src = small_timm("siglip_map", seed=11)
    x = images_for(src)
    flags = fused_flags(src)
    assert all(flags.values())
    with torch.no_grad():
        before = src(x)
    traced = px.load(src, backend="nnsight")
    with torch.no_grad():
        with traced.trace(x):
            traced.site("blocks.1.attn.hook_pattern").save()
            during = traced.output.save()
    assert fused_flags(src) == flags
    torch.testing.assert_close(during, before, atol=ATOL, rtol=0)
    with pytest.raises(RuntimeError, match="boom"):
        with traced.trace(x):
            traced.site("blocks.0.attn.hook_pattern")
            raise RuntimeError("boom")
    assert fused_flags(src) == flags
    with pytest.raises(InputError):  # an error raised by the site machinery itself
        with traced.trace(x):
            traced.site("blocks.0.attn.hook_pattern")
            traced.set_site("blocks.1.hook_resid_post", torch.zeros(3))
    assert fused_flags(src) == flags
    with traced.trace(x):  # a backward trace registers tensor hooks; they must go too
        act = traced.site("blocks.1.attn.hook_pattern")
        loss = traced.output.sum()
        with loss.backward():
            act.grad.save()
    src.zero_grad(set_to_none=True)
    assert fused_flags(src) == flags
    assert not module_hooks(src)
    with torch.no_grad():
        assert torch.equal(src(x), before)
        assert torch.equal(traced(x), before)  # outside a trace it is the module's forward


# ---------------------------------------------------------------- errors
def test_unknown_and_unmapped_sites_name_the_closest():
    src, _, traced = load_both("plain")
    x = images_for(src)
    with pytest.raises(UnknownNameError, match="blocks.0.hook_resid_post"):
        with traced.trace(x):
            traced.site("blocks.0.hook_resid_psot")
    with pytest.raises(UnknownNameError, match="not mapped"):
        with traced.trace(x):
            traced.site("blocks.0.attn.hook_attn_scores")
    with pytest.raises(UnknownNameError, match="closest"):
        traced.select_sites(["blocks.7.hook_resid_post"])
    with pytest.raises(PrismaError, match="inside"):
        traced.site("blocks.0.hook_resid_post")


def test_bad_images_and_options_are_refused():
    src, _, traced = load_both("plain")
    with pytest.raises(InputError, match="32x32"):
        with traced.trace(torch.randn(1, 3, 40, 40)):
            traced.output.save()
    with pytest.raises(InputError, match="NaN"):
        with traced.trace(torch.full((1, 3, 32, 32), float("nan"))):
            traced.output.save()
    with pytest.raises(PrismaError, match="fold_ln"):
        px.load(src, backend="nnsight", fold_ln=True)


def test_load_by_name():
    traced = px.load("timm:vit_small_patch14_reg4_dinov2", pretrained=False, backend="nnsight",
                     img_size=28, depth=1, embed_dim=24, num_heads=2)
    assert type(traced).__name__ == "TracedViT"
    assert traced.layout.prefix_names == ("cls", "reg0", "reg1", "reg2", "reg3")
    assert traced.layout.grid == (2, 2) and len(traced.blocks) == 1


def test_import_stays_light():
    code = ("import sys, prisma_ext, prisma_ext.traced; "
            "assert not {'nnsight', 'torch'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
