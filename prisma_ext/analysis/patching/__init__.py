"""Patching: activation patching (exact, batched), attribution patching (its gradient estimate)
and image-text patching (either CLIP tower, scored by image-text similarity).

`plan` resolves a request (sites, layers, heads, positions, chunk sizes) and lays out results,
`positions` the position specs, `runner` runs and scores chunks of patched forwards through
`Backend.run` / `Backend.restart`, and `activation`, `attribution`, `image_text` are the methods.
All three take the same arguments: `(model, clean, corrupted, target=None, *, sites, positions,
heads, layers, direction, normalize, batch_size, progress)`.
"""

from .activation import activation_patching
from .attribution import attribution_patching
from .image_text import image_text_patching
from .positions import PositionGroups, resolve_positions

__all__ = ["PositionGroups", "activation_patching", "attribution_patching", "image_text_patching",
           "resolve_positions"]
