"""Data that ships with prisma-ext: sample images and seeded procedural data sets.

`make_scenes` (captioned shapes or digits with masks and positions, `prisma_ext.data.scenes`) is
what the built-in models were trained on.
"""

from prisma_ext.data.samples import SAMPLE_IMAGES, load_image, sample_image
from prisma_ext.data.scenes import Scenes, make_scenes

__all__ = ["SAMPLE_IMAGES", "Scenes", "load_image", "make_scenes", "sample_image"]
