"""Small random CLIP models: open_clip configs shrunk with every structural flag kept, and HF."""

from __future__ import annotations

import copy

import torch

from tests.support.models import randomize_

SMALL_VISION = dict(width=48, layers=2, head_width=16, image_size=32, patch_size=8)
SMALL_TEXT = dict(width=32, heads=2, layers=2)


def shrunk_open_clip_cfg(name: str) -> dict:
    """open_clip's config for `name` at small widths and depths; pooling, ln_pre, attentional
    pooler, activation, eps, masks and projections untouched."""
    from open_clip.factory import get_model_config

    cfg = copy.deepcopy(get_model_config(name))
    cfg["embed_dim"] = 24
    cfg["vision_cfg"].update(SMALL_VISION)
    if cfg["vision_cfg"].get("attentional_pool"):
        cfg["vision_cfg"].update(attn_pooler_queries=4, attn_pooler_heads=2)
    cfg["text_cfg"].update(SMALL_TEXT)
    if "multimodal_cfg" in cfg:
        cfg["multimodal_cfg"].update(width=32, heads=2, layers=1, n_queries=4, attn_pooler_heads=2)
    return cfg


def small_open_clip(name: str, seed: int = 0):
    """A random open_clip model of `name`'s structure, in eval mode, marked with its arch name."""
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = shrunk_open_clip_cfg(name)
    custom = cfg.pop("custom_text", False)
    cls = CoCa if "multimodal_cfg" in cfg else (CustomTextCLIP if custom else CLIP)
    model = randomize_(cls(**cfg).eval(), seed)
    model._prisma_arch = name
    return model


def text_tokens_for(text_cfg, batch: int = 3, length: int | None = None, seed: int = 2) -> torch.Tensor:
    """Random token ids a text tower accepts, with an end-of-text token where its pooling looks."""
    gen = torch.Generator().manual_seed(seed)
    length = length or text_cfg.context_length
    tokens = torch.randint(1, min(text_cfg.vocab_size, 1000), (batch, length), generator=gen)
    ends = torch.randint(3, length, (batch,), generator=gen)
    for i, end in enumerate(ends.tolist()):
        tokens[i, end] = text_cfg.vocab_size - 1 if text_cfg.pool == "argmax" else text_cfg.eos_id
        tokens[i, end + 1:] = 0
    return tokens


def small_hf_clip(seed: int = 0, act: str = "quick_gelu", eos_token_id: int = 49407):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=20, hidden_act=act,
                         layer_norm_eps=1e-5, eos_token_id=eos_token_id),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8, hidden_act=act, layer_norm_eps=1e-5),
        projection_dim=24,
    )
    return randomize_(CLIPModel(config).eval(), seed)
