"""TracedCLIP: an open_clip or Hugging Face CLIP model traced by nnsight, with HookedCLIP's names.

    clip = px.load(open_clip_model, backend="nnsight")
    with clip.trace(images, tokens):                       # the source's own forward
        resid = clip.site("visual.blocks.3.hook_resid_post").save()   # [batch, pos, d_model]
        pattern = clip.site("text.blocks.0.attn.hook_pattern").save() # [batch, head, q, k]
        out = clip.output.save()

Inputs are what the source's forward takes: open_clip `(image, text)`, Hugging Face
`(input_ids=..., pixel_values=...)`; `CLIPVisionModel` takes images only and uses the
vision tower's unprefixed names, like its HookedViT.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PrismaError
from .clip_encoders import ClipEncoders
from .clip_inputs import ClipInputs, ScalarSafeBatcher, check_tokens
from .model import NameFilter, TracedModel

CLIP_NOT_MAPPED = {
    "hook_pos_embed": "position embeddings are added inline (open_clip) or are one [1, pos, d_model] "
                      "row shared by the batch (Hugging Face); read blocks.0.hook_resid_pre",
    "hook_scale": "LayerNorm's scale is computed inside the fused norm kernel",
}


class TracedCLIP(ClipEncoders, TracedModel):
    """A CLIP model (both towers, or a vision tower alone) traced by nnsight.

    `site(name)` / `set_site(name, value)` take HookedCLIP's names (`visual.…`, `text.…`);
    `cfg` is the image tower's `ViTConfig`, `text_cfg` the text tower's `TextConfig` (None
    for a vision-only model). Several invokes batch: each passes images, token ids or both (as
    many of each: they are pairs), with the same shapes apart from the batch size.
    `tokenize`, `encode_image`, `encode_text`, `zero_shot_classifier` and `use_zero_shot_head`
    are HookedCLIP's (`clip_encoders`), each encoder one trace of the source's own tower.
    """

    _PX_DERIVED = TracedModel._PX_DERIVED + ("_px_text_config", "_px_inputs")
    _batcher_class = ScalarSafeBatcher

    def _px_bind(self, module: nn.Module, adapter: Any) -> None:
        super()._px_bind(module, adapter)
        names = self._px_sites
        self._px_prefixes = {t: f"{t}." for t in ("visual", "text") if any(n.startswith(f"{t}.") for n in names)}
        if not self._px_prefixes:  # a vision tower on its own: HookedViT's unprefixed names
            self._px_prefixes = {"visual": ""}
        self._px_text_config = adapter.text_config(module) if "text" in self._px_prefixes else None
        self._px_inputs = ClipInputs(module, self._check_images, self._check_tokens if self._px_text_config else None)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_px_tokenizer", None)  # possibly a factory (a closure); rebuilt on first use
        return state

    @property
    def text_cfg(self) -> Any:
        """The text tower's `TextConfig` (None for a vision-only model)."""
        self._px_live()
        return self._px_text_config

    @property
    def _inputs(self) -> ClipInputs:
        self._px_live()
        return self._px_inputs

    @property
    def towers(self) -> dict[str, str]:
        """Tower -> the prefix its site names carry ({"visual": "visual.", "text": "text."})."""
        return dict(self._px_prefixes)

    # ------------------------------------------------------------------ batching (nnsight)
    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        return self._inputs.rows(inputs, kwargs)

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        return self._inputs.concat(invokes)

    def _check_images(self, images: Tensor) -> None:
        from ..hooked.inputs import check_images

        check_images(images, self.cfg)

    def _check_tokens(self, tokens: Tensor) -> None:
        cfg = self.text_cfg
        check_tokens(tokens, cfg.vocab_size, cfg.context_length)

    # ------------------------------------------------------------------ reading sites
    def run_with_cache(self, *inputs: Any, names_filter: NameFilter = None, **kwargs: Any
                       ) -> tuple[Any, dict[str, Tensor]]:
        """Run the source's forward on `inputs` (as it takes them) and read sites:
        (output, {name: tensor}), detached. By default every site of the towers the inputs
        reach (open_clip runs only the towers it is given inputs for)."""
        from nnsight import save

        named = self._inputs.bind(inputs, kwargs)
        ran = {t for t, key in (("visual", self._inputs.image), ("text", self._inputs.text))
               if key is not None and key in named}
        if names_filter is None:
            selected = [n for n in self.site_names if self.tower_of(n) in ran]
        else:
            selected = self.select_sites(names_filter)
            missing = sorted({self.tower_of(n) for n in selected} - ran)
            if missing:
                raise PrismaError(f"sites of the {' and '.join(missing)} tower(s) need its inputs "
                                  f"({self._inputs._names()})")
        with self.trace(*inputs, **kwargs):
            cache = save({})
            self.prepare(selected)
            for name in selected:
                cache[name] = self.site(name).detach()
            output = save(self.output)
        return output, cache

    def tower_of(self, name: str) -> str:
        """The tower a site name belongs to: "visual" or "text"."""
        for tower, prefix in self._px_prefixes.items():
            if prefix and name.startswith(prefix):
                return tower
        return "visual"

    def example_inputs(self, batch_size: int = 1) -> dict[str, Tensor]:
        """Zero images and token ids (an end-of-text token where the text tower pools) by the
        names the source's forward takes."""
        cfg, inputs, device = self.cfg, {}, self.input_device
        if self._inputs.image:
            inputs[self._inputs.image] = torch.zeros(batch_size, cfg.in_chans, *cfg.img_size,
                                                        device=device, dtype=cfg.dtype)
        tcfg = self.text_cfg
        if tcfg is not None and self._inputs.text:
            tokens = torch.zeros(batch_size, tcfg.context_length, dtype=torch.long, device=device)
            end = {"argmax": tcfg.vocab_size - 1, "eos": tcfg.eos_id}.get(tcfg.pool)
            if end is not None:
                tokens[:, 1] = end
            inputs[self._inputs.text] = tokens
        return inputs

    def site_shapes(self, batch_size: int = 1) -> dict[str, tuple[int, ...]]:
        """Every site name with its activation shape, from one traced forward pass on zeros."""
        with torch.no_grad():
            _, cache = self.run_with_cache(**self.example_inputs(batch_size))
        return {name: tuple(t.shape) for name, t in cache.items()}

    def _not_mapped_reason(self, name: Any) -> str:
        last = name.rsplit(".", 1)[-1] if isinstance(name, str) else ""
        if last in CLIP_NOT_MAPPED:
            return f"{last} is not mapped here: {CLIP_NOT_MAPPED[last]}"
        return super()._not_mapped_reason(name)
