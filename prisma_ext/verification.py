"""`px.load` checks its own work: the loaded model against the source's own forward, on a small
seeded probe at the model's input size.

- TL backend: the hooked model's output (for CLIP: both embeddings) against the adapter's
  `reference_output` (the source module's own forward). On a mismatch the residual stream is
  compared block by block, read from the source through the adapter's site map with plain torch
  hooks, and the error names the first block that diverges and by how much.
- nnsight backend: every mapped site is read once in one trace and compared with the same site
  of the converted model (when the adapter converts), so a site map that reads the wrong tensor
  (a residual stream where a block's output belongs, a module that adds in place) fails here.

The probe is drawn from a private generator (the global RNG is untouched), the source runs in
eval mode (its own mode is restored), and nothing is left attached. `verify=False` skips it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._state import eval_mode
from .errors import PrismaError

PROBE_BATCH = 2
SEED = 20261201


class VerificationError(PrismaError):
    """A loaded model that does not reproduce its source."""


# ------------------------------------------------------------------ tolerances and probes
def tolerance(reference: Tensor) -> float:
    """The largest gap accepted against `reference`: 1e-4 + rtol * its largest magnitude, with
    rtol 1e-4 in float32 (1e-2 in half precision)."""
    rtol = 1e-4 if reference.dtype in (torch.float32, torch.float64) else 1e-2
    return 1e-4 + rtol * float(reference.detach().abs().max())


def gap(got: Tensor, want: Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    return float((got.detach().float() - want.detach().float()).abs().max())


def probe_images(cfg: Any, device: Any, dtype: torch.dtype) -> Tensor:
    """Seeded images [2, in_chans, H, W] at the model's input size, about the scale of normalised pixels."""
    gen = torch.Generator().manual_seed(SEED)
    images = torch.randn(PROBE_BATCH, cfg.in_chans, *cfg.img_size, generator=gen)
    return images.to(device=device, dtype=dtype)


def probe_tokens(cfg: Any, device: Any) -> Tensor:
    """Seeded token ids [2, context] ending where the text tower pools (its end-of-text token)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    n = cfg.context_length
    tokens = torch.randint(1, max(2, min(cfg.vocab_size - 1, 1000)), (PROBE_BATCH, n), generator=gen)
    ends = [min(n - 1, 5), min(n - 1, 9)]
    end_id = {"argmax": cfg.vocab_size - 1, "eos": cfg.eos_id}.get(cfg.pool)
    for row, end in enumerate(ends):
        if end_id is not None:
            tokens[row, end] = end_id
            tokens[row, end + 1:] = 0
    return tokens.to(device)


def _param(module: nn.Module) -> Tensor:
    return next(iter(module.parameters()))


# ------------------------------------------------------------------ the TL backend
def verify_hooked(adapter: Any, module: nn.Module, model: nn.Module, source: str) -> None:
    """Raise VerificationError unless the hooked `model` reproduces `module` on the probe."""
    from .hooked.clip import HookedCLIP

    param = _param(module)
    vision = model.visual if isinstance(model, HookedCLIP) else model
    images = probe_images(vision.cfg, param.device, param.dtype)
    with eval_mode(module), torch.no_grad():
        checks: list[tuple[str, Callable[[], Tensor], Callable[[], Tensor], str]] = []
        if isinstance(model, HookedCLIP):
            tokens = probe_tokens(model.text.cfg, param.device)
            checks.append(("image embedding", lambda: adapter.reference_image_embed(module, images),
                           lambda: model.encode_image(images.to(vision.cfg.device, vision.cfg.dtype)), "visual"))
            checks.append(("text embedding", lambda: adapter.reference_text_embed(module, tokens),
                           lambda: model.encode_text(tokens.to(model.text.cfg.device)), "text"))
        else:
            checks.append(("output", lambda: adapter.reference_output(module, images),
                           lambda: model(images.to(vision.cfg.device, vision.cfg.dtype)), ""))
        for what, reference, converted, tower in checks:
            want = _run_source(reference, source)
            got = converted()
            if gap(got, want.to(got.device)) <= tolerance(want):
                continue
            if got.shape != want.shape:
                how = f"has shape {tuple(got.shape)} where the source's own forward gives {tuple(want.shape)}"
            else:
                how = (f"differs from the source's own forward by {gap(got, want.to(got.device)):.3g} (largest "
                       f"|difference| on a seeded probe; tolerance {tolerance(want):.2g})")
            where = _first_divergence(adapter, module, model, images if tower != "text" else tokens, tower)
            raise VerificationError(
                f"px.load: the converted model does not reproduce {source}: its {what} {how}. {where} "
                "Look further with px.load(..., verify=False), "
                "comparing model.run_with_cache(x) with the source's blocks; an adapter of your own may have a "
                "config field wrong (attention scale, norms, pooling) or leave a part out")


def _run_source(reference: Callable[[], Tensor], source: str) -> Tensor:
    try:
        out = reference()
    except Exception as err:  # the source's own forward is not ours to fix; say so and how to skip
        raise VerificationError(f"px.load: the source's own forward fails on a probe of its input size, so the "
                                f"conversion of {source} cannot be checked ({type(err).__name__}: {err}); "
                                "px.load(..., verify=False) skips the check") from err
    if not isinstance(out, Tensor):
        raise VerificationError(f"px.load: the adapter's reference output of {source} is a {type(out).__name__}, "
                                "not a tensor: its reference_output must return the tensor the hooked model's "
                                "forward gives")
    return out


def _resid_sites(adapter: Any, module: nn.Module, tower: str) -> dict[str, Any]:
    """The source's residual-stream sites (TL name without the tower prefix -> Site), in order."""
    try:
        sites = adapter.site_map(module)
    except PrismaError:
        return {}
    prefix = f"{tower}." if tower and any(n.startswith(f"{tower}.") for n in sites) else ""
    out = {}
    for name, site in sites.items():
        if name.startswith(prefix) and name.endswith(("hook_resid_pre", "hook_resid_post")) and site.prepare is None:
            short = name[len(prefix):]
            if short.endswith("hook_resid_post") or short == "blocks.0.hook_resid_pre":
                out[short] = site
    return out


def _first_divergence(adapter: Any, module: nn.Module, model: nn.Module, inputs: Tensor, tower: str) -> str:
    """Which residual stream diverges first between the source (read with torch hooks through the
    adapter's site map) and the hooked model, as a sentence."""
    sites = _resid_sites(adapter, module, tower)
    if not sites:
        return ("The adapter has no site map to compare the blocks with (add `site_map` to see which block "
                "diverges).")
    source_values = read_sites(module, sites, lambda: _forward(adapter, module, inputs, tower))
    hooked = getattr(model, tower) if tower else model
    with torch.no_grad():
        _, cache = hooked.run_with_cache(inputs.to(hooked.cfg.device), names_filter=list(source_values))
    matched = []
    for name, value in source_values.items():
        got = cache[name]
        if gap(got, value.to(got.device)) > tolerance(value):
            head = f"the residual stream first diverges at {tower + '.' if tower else ''}{name}"
            return (f"{head} (largest |difference| {gap(got, value.to(got.device)):.3g}); "
                    + (f"{', '.join(matched[-3:])} match." if matched else "nothing before it was compared."))
        matched.append(name)
    return "Every block's residual stream matches: the difference is in the readout (final norm, pooling, head)."


def _forward(adapter: Any, module: nn.Module, inputs: Tensor, tower: str) -> Any:
    if tower == "visual":
        return adapter.reference_image_embed(module, inputs)
    if tower == "text":
        return adapter.reference_text_embed(module, inputs)
    return adapter.reference_output(module, inputs)


def read_sites(module: nn.Module, sites: dict[str, Any], run: Callable[[], Any]) -> dict[str, Tensor]:
    """The values of `sites` (name -> Site with a module path, a port and a view) during `run()`,
    read with plain torch hooks that are removed afterwards."""
    values: dict[str, Tensor] = {}
    handles = []
    try:
        for name, site in sites.items():
            target = module.get_submodule(site.module) if site.module else module

            def keep(value: Tensor, name: str = name, site: Any = site) -> None:
                values[name] = site.view.read(value).detach().clone()

            if site.port == "input":
                handles.append(target.register_forward_pre_hook(lambda m, args, keep=keep: keep(args[0])))
            else:
                handles.append(target.register_forward_hook(lambda m, args, out, keep=keep: keep(out)))
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: values[name] for name in sites if name in values}


# ------------------------------------------------------------------ the nnsight backend
def verify_traced(adapter: Any, module: nn.Module, traced: Any, source: str) -> None:
    """Read every mapped site of `traced` once and compare it with the converted model's."""
    clip = hasattr(traced, "towers")
    try:
        hooked = adapter.to_hooked(module)
    except PrismaError:
        hooked = _hooked_vision(adapter, module) if clip else None  # else reading every site once is the check
    param = _param(module)
    images = probe_images(traced.cfg, param.device, param.dtype)
    with eval_mode(module), torch.no_grad():
        try:
            if clip:
                inputs = traced.example_inputs(PROBE_BATCH)
                image_key = next((k for k, v in inputs.items() if v.is_floating_point()), None)
                if image_key is not None:
                    inputs[image_key] = images
                text_key = next((k for k, v in inputs.items() if not v.is_floating_point()), None)
                if text_key is not None and traced.text_cfg is not None:
                    inputs[text_key] = probe_tokens(traced.text_cfg, param.device)
                _, sites = traced.run_with_cache(**inputs)
            else:
                _, sites = traced.run_with_cache(images)
        except PrismaError:
            raise
        except Exception as err:
            raise VerificationError(f"px.load: reading every mapped site of {source} once on a probe fails "
                                    f"({type(err).__name__}: {err}): the adapter's site map does not fit the module; "
                                    "px.load(..., verify=False) skips the check") from err
        if hooked is None:
            return
        reference = _hooked_cache(hooked, images, inputs if clip else None,
                                  traced.towers.get("visual", "") if clip else "")
    for name, value in sites.items():  # forward order: the first mismatch is the first divergence
        if name not in reference:
            continue
        want = reference[name]
        if gap(value, want.to(value.device)) > tolerance(want):
            raise VerificationError(
                f"px.load: site {name} of the traced {source} differs from the converted model's by "
                f"{gap(value, want.to(value.device)):.3g} (shapes {tuple(value.shape)} and {tuple(want.shape)}): the "
                "site map reads another tensor than the TL site holds (e.g. a module that adds the residual in "
                "place, `x += ...`, turns its output into the residual stream). Fix the adapter's site map "
                "(docs/adapters.md), or px.load(..., verify=False)")


def _hooked_vision(adapter: Any, module: nn.Module) -> nn.Module | None:
    """The image tower of a CLIP whose text tower only the nnsight backend takes, converted on
    its own (its sites are then checked; the text tower's are read once), or None."""
    try:
        return adapter.to_hooked_vision(module)
    except PrismaError:
        return None


def _hooked_cache(hooked: nn.Module, images: Tensor, clip_inputs: dict | None, vision_prefix: str = ""
                  ) -> dict[str, Tensor]:
    from .hooked.clip import HookedCLIP

    if isinstance(hooked, HookedCLIP):
        cache: dict[str, Tensor] = {}
        _, vis = hooked.visual.run_with_cache(images.to(hooked.visual.cfg.device))
        cache.update({f"visual.{k}": v for k, v in vis.items()})
        tokens = next((v for v in (clip_inputs or {}).values() if not v.is_floating_point()), None)
        if tokens is not None:
            _, txt = hooked.text.run_with_cache(tokens.to(hooked.text.cfg.device))
            cache.update({f"text.{k}": v for k, v in txt.items()})
        return cache
    _, cache = hooked.run_with_cache(images.to(hooked.cfg.device))
    return {vision_prefix + k: v for k, v in cache.items()}
