"""Moved to `prisma_ext.sitemaps.open_clip` and `prisma_ext.sitemaps.hf` (this path works for one
more release, with a DeprecationWarning)."""

from .._deprecated import warn


def __getattr__(name: str):
    from ..sitemaps import hf, open_clip

    moved = {"open_clip_visual": open_clip.open_clip_visual_sites, "open_clip_text": open_clip.open_clip_text_sites,
             "hf_vision": hf.hf_clip_vision_sites, "hf_text": hf.hf_clip_text_sites, "hf_vit": hf.hf_vit_sites}
    if name not in moved:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warn(f"{__name__}.{name}", f"{moved[name].__module__}.{moved[name].__name__}")
    return moved[name]
