"""TracedLlava: a Hugging Face `LlavaForConditionalGeneration` traced by nnsight, its vision tower
read by a CLIP image tower's site names.

    llava = px.load("hf:FOLDER_OR_REPO", backend="nnsight")
    inputs = llava.inputs(images, prompt_ids)         # the image token once in the prompt
    with llava.trace(**inputs):
        resid = llava.site("visual.blocks.3.hook_resid_post").save()   # [batch, pos, d_vision]
        tokens = llava.site("visual.hook_projected").save()            # [batch, n_image_tokens, d_lm]
        logits = llava.output.logits[:, -1].save()                     # next-token logits [batch, vocab]

Sites: the tower's (`visual.…`, as `CLIPVisionModel` / `SiglipVisionModel` map them), the
projector's input and output (`visual.hook_image_features`, `visual.hook_projected`) and the
language model's residual stream (`lm.blocks.{i}.…`, `lm.ln_final.hook_normalized`), in forward
order (`prisma_ext.sitemaps.hf_llava`). `projector_reads` says which tower site the projector
reads (`vision_feature_layer`, often -2: not the last block).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, PrismaError
from ..sitemaps.hf_llava import ProjectorInput, projector_input
from .clip_inputs import ScalarSafeBatcher, check_tokens
from .llava_inputs import LlavaInputs, Prompt, build_inputs, expand_prompt
from .model import NameFilter, TracedModel

LLAVA_NOT_MAPPED = {
    "hook_image_embed": "LLaVA never computes the tower's contrastive embedding; the image tokens the language "
                        "model reads are visual.hook_projected",
    "hook_pos_embed": "position embeddings are one [1, pos, d_model] row shared by the batch; read "
                      "visual.blocks.0.hook_resid_pre",
    "hook_scale": "the norm's scale is computed inside the norm kernel",
}
LM_ATTENTION = ("attn.", "mlp.hook_")


class TracedLlava(TracedModel):
    """A `LlavaForConditionalGeneration` traced by nnsight (see the module docstring).

    `cfg`/`layout`: the vision tower's `ViTConfig` and token layout; `image_token_id`,
    `n_image_tokens`: what one image is in the prompt; `inputs(images, prompt)` builds the
    forward's arguments; `backend(prompt)` is the analysis methods' view (activation patching on
    the tower, scored by next-token logits). Invokes take the forward's arguments; several
    invokes batch (one image per prompt, prompts of one length).
    """

    _PX_DERIVED = TracedModel._PX_DERIVED + ("_px_inputs", "_px_projector")
    _batcher_class = ScalarSafeBatcher

    def _px_bind(self, module: nn.Module, adapter: Any) -> None:
        super()._px_bind(module, adapter)
        self._px_projector = projector_input(module)
        self._px_inputs = LlavaInputs(module, self._check_images, self._check_tokens)

    # ------------------------------------------------------------------ what is here
    @property
    def llava_config(self) -> Any:
        """The checkpoint's `LlavaConfig` (vision_config, text_config, image_token_id, ...)."""
        return self._module.config

    @property
    def image_token_id(self) -> int:
        return int(self._module.config.image_token_id)

    @property
    def n_image_tokens(self) -> int:
        """Tokens one image becomes in the language model's input (= `visual.hook_projected`'s pos)."""
        return self._inputs.n_image_tokens

    @property
    def projector_reads(self) -> ProjectorInput:
        """The tower site(s) `visual.hook_image_features` is cut from (`.sites`, from token
        `.first_token` on): `vision_feature_layer` -2 of a 24-layer tower is
        `visual.blocks.22.hook_resid_post`."""
        self._px_live()
        return self._px_projector

    @property
    def _inputs(self) -> LlavaInputs:
        self._px_live()
        return self._px_inputs

    def tower_of(self, name: str) -> str:
        """"visual" (the tower and the projector) or "lm" (the language model)."""
        return "lm" if name.startswith("lm.") else "visual"

    # ------------------------------------------------------------------ inputs
    def inputs(self, images: Any, prompt: Prompt) -> dict[str, Tensor]:
        """The forward's arguments: `input_ids` [batch, seq] with the prompt's one image token
        expanded to the image's `n_image_tokens`, `pixel_values` [batch, C, H, W] and
        `attention_mask` (ones). `images`: a tensor (normalised, e.g. `preprocess`), or an image /
        list of images (HxWx3 arrays or PIL, preprocessed here). `prompt`: token ids [seq] for
        every image, or [batch, seq] (tokenize with the checkpoint's tokenizer)."""
        if not isinstance(images, Tensor):
            many = images if isinstance(images, (list, tuple)) else [images]
            images = torch.cat([self.preprocess(im) for im in many])
        self._check_images(images)
        return build_inputs(self._module, images, prompt)

    def example_inputs(self, batch_size: int = 1) -> dict[str, Tensor]:
        """Zero images and a prompt of the image's tokens and one more token."""
        cfg = self.cfg
        images = torch.zeros(batch_size, cfg.in_chans, *cfg.img_size, device=self.device, dtype=cfg.dtype)
        return self.inputs(images, [self.image_token_id, 0 if self.image_token_id else 1])

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        return self._inputs.rows(inputs, kwargs)

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        return self._inputs.concat(invokes)

    def _check_images(self, images: Tensor) -> None:
        from ..hooked.inputs import check_images

        if isinstance(images, Tensor) and images.ndim == 4 and tuple(images.shape[-2:]) != tuple(self.cfg.img_size):
            raise InputError(f"expected images of {self.cfg.img_size[0]}x{self.cfg.img_size[1]} (the vision tower's "
                             f"image_size), got {images.shape[-2]}x{images.shape[-1]}: resize them (model.preprocess)")
        check_images(images, self.cfg)

    def _check_tokens(self, tokens: Tensor) -> None:
        text = self._module.config.text_config
        check_tokens(tokens, text.vocab_size, text.max_position_embeddings)

    # ------------------------------------------------------------------ reading sites
    def run_with_cache(self, *inputs: Any, names_filter: NameFilter = None, **kwargs: Any
                       ) -> tuple[Any, dict[str, Tensor]]:
        """Run the forward on `inputs` (as it takes them, e.g. `**model.inputs(images, prompt)`)
        and read sites: (output, {name: tensor}), detached. By default every site the inputs
        reach (without `pixel_values` the tower does not run)."""
        from nnsight import save

        images = self._inputs.has_images(inputs, kwargs)
        if names_filter is None:
            selected = [n for n in self.site_names if images or self.tower_of(n) == "lm"]
        else:
            selected = self.select_sites(names_filter)
            if not images and any(self.tower_of(n) == "visual" for n in selected):
                raise PrismaError("the vision tower's and projector's sites need pixel_values (the tower does not "
                                  "run without them): pass model.inputs(images, prompt)")
        with self.trace(*inputs, **kwargs):
            cache = save({})
            self.prepare(selected)
            for name in selected:
                cache[name] = self.site(name).detach()
            output = save(self.output)
        return output, cache

    def site_shapes(self, batch_size: int = 1) -> dict[str, tuple[int, ...]]:
        """Every site name with its activation shape, from one traced forward pass on zeros."""
        with torch.no_grad():
            _, cache = self.run_with_cache(**self.example_inputs(batch_size))
        return {name: tuple(t.shape) for name, t in cache.items()}

    def _not_mapped_reason(self, name: Any) -> str:
        if not isinstance(name, str):
            return ""
        last = name.rsplit(".", 1)[-1]
        if name.startswith("lm.") and any(part in name for part in LM_ATTENTION):
            return ("the language model's attention and MLP insides (rotary q/k, grouped k/v heads, gated MLP) are "
                    "not mapped: reach them through nnsight, model.model.language_model.layers[i]")
        if name.startswith("lm.") and not any(n.startswith("lm.") for n in self._px_sites):
            return ("this language model's layers are not Llama-style (input_layernorm, self_attn, "
                    "post_attention_layernorm, mlp), so none of its sites are mapped: use model.model.language_model")
        if last in LLAVA_NOT_MAPPED:
            return f"{last} is not mapped here: {LLAVA_NOT_MAPPED[last]}"
        return super()._not_mapped_reason(name)

    # ------------------------------------------------------------------ analysis, checks
    def expand_prompt(self, prompt: Prompt) -> Tensor:
        """Token ids [rows, seq] with the prompt's one image token expanded to this model's
        `n_image_tokens` copies (`llava_inputs.expand_prompt`)."""
        return expand_prompt(prompt, self.image_token_id, self.n_image_tokens)

    def _px_verify(self, source: str) -> None:
        """`px.load`'s check: every site read once on a probe; the tower's residual stream equal
        to its own `hidden_states`, the projector's input to those the config selects, its output
        to `get_image_features`, the logits to the module's own forward."""
        from .llava_check import verify_llava

        verify_llava(self, source)
