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
    if text_cfg.pool not in ("argmax", "eos"):
        return tokens  # pooled at a fixed position: no end-of-text token to place
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


TRUNK_SHRINK = dict(depth=2, embed_dim=32, num_heads=2)


def small_open_clip_timm(name: str, seed: int = 0, on_meta: bool = False):
    """A random open_clip model of `name` whose visual tower is a timm trunk: the trunk built by
    timm from the same model name and arguments open_clip passes, with fewer layers, a narrower
    width and a two-by-two patch grid (every other flag kept), and the text tower shrunk as in
    `small_open_clip`. `on_meta`: a trunk family that cannot be shrunk this way is built at full
    size on the meta device (no weights), for checking a refusal."""
    import timm
    from open_clip import timm_model
    from open_clip.factory import get_model_config
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(get_model_config(name))
    cfg["embed_dim"] = 24 if cfg["vision_cfg"].get("timm_proj") != "none" else TRUNK_SHRINK["embed_dim"]
    patch = 14 if "patch14" in cfg["vision_cfg"]["timm_model_name"] else 16
    cfg["vision_cfg"]["image_size"] = 2 * patch
    cfg["text_cfg"].update(SMALL_TEXT)
    custom = cfg.pop("custom_text", False)
    real = timm.create_model

    def shrunk(model_name, **kwargs):
        return real(model_name, **{**kwargs, **TRUNK_SHRINK, "img_size": 2 * patch})

    timm_model.timm.create_model = shrunk
    try:
        model = (CustomTextCLIP if custom else CLIP)(**cfg)
    except (TypeError, AssertionError):  # a trunk that takes no such arguments (ConvNeXt, FastViT, ...)
        if not on_meta:
            raise
        with torch.device("meta"):  # built at full size without weights: enough for a refusal by name
            timm_model.timm.create_model = real
            full = copy.deepcopy(get_model_config(name))
            full.pop("custom_text", None)
            model = (CustomTextCLIP if custom else CLIP)(**full)
        model._prisma_arch = name
        return model.eval()
    finally:
        timm_model.timm.create_model = real
    model = randomize_(model.eval(), seed)
    model._prisma_arch = name
    return model


def tiny_hf_text_config(hf_name: str):
    """A two-layer, 32-wide config of the Hugging Face encoder family `hf_name` names
    (roberta-base, xlm-roberta-*, google/mt5-*, facebook/nllb-*), as open_clip would fetch it."""
    from transformers import M2M100Config, MT5Config, RobertaConfig, XLMRobertaConfig

    bert = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=40, pad_token_id=1)
    if hf_name.startswith("xlm-roberta"):
        config = XLMRobertaConfig(**bert)
    elif hf_name.startswith("roberta"):
        config = RobertaConfig(**bert)
    elif "mt5" in hf_name:
        config = MT5Config(vocab_size=120, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=1,
                           num_heads=2, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    elif "nllb" in hf_name:
        config = M2M100Config(vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=1,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, max_position_embeddings=40, pad_token_id=1)
    else:
        raise ValueError(f"no tiny config for {hf_name}")
    config._name_or_path = hf_name
    return config


def small_open_clip_hf_text(name: str, seed: int = 0):
    """A random open_clip model of `name` whose text tower is a Hugging Face encoder: the
    encoder from `tiny_hf_text_config` (in place of the hub download open_clip makes), the image
    tower shrunk as in `small_open_clip` / `small_open_clip_timm`."""
    from open_clip import hf_model
    from open_clip.coca_model import CoCa
    from open_clip.factory import get_model_config
    from open_clip.model import CustomTextCLIP
    from transformers import AutoModel

    tiny = tiny_hf_text_config(get_model_config(name)["text_cfg"]["hf_model_name"])

    class OfflineAutoConfig:
        @staticmethod
        def from_pretrained(_name, **kwargs):
            return copy.deepcopy(tiny)

    class OfflineAutoModel:
        from_config = staticmethod(AutoModel.from_config)

        @staticmethod
        def from_pretrained(config, **kwargs):
            return AutoModel.from_config(config if not isinstance(config, str) else copy.deepcopy(tiny), **kwargs)

    real = hf_model.AutoConfig, hf_model.AutoModel
    hf_model.AutoConfig, hf_model.AutoModel = OfflineAutoConfig, OfflineAutoModel
    try:
        if get_model_config(name)["vision_cfg"].get("timm_model_name"):
            return small_open_clip_timm(name, seed)
        cfg = shrunk_open_clip_cfg(name)
        cfg.pop("custom_text", None)
        cls = CoCa if "multimodal_cfg" in cfg else CustomTextCLIP
        model = randomize_(cls(**cfg).eval(), seed)
    finally:
        hf_model.AutoConfig, hf_model.AutoModel = real
    model._prisma_arch = name
    return model


def swapped_attention(src) -> dict:
    """What the attention sites switch for a trace: open_clip's controller bodies, HF configs."""
    from nnsight.intervention.source import STATE

    found = {}
    for name, mod in src.named_modules():
        if isinstance(mod, torch.nn.MultiheadAttention) and STATE in mod.__dict__:
            found[name] = mod.__dict__[STATE].body
        elif type(mod).__name__ == "CLIPAttention":
            found[name] = (mod.config, mod.config._attn_implementation)
    return found
