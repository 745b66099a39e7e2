"""Data that ships with prisma-ext: sample images (and, later, datasets and class names)."""

from prisma_ext.data.samples import SAMPLE_IMAGES, load_image, sample_image

__all__ = ["SAMPLE_IMAGES", "load_image", "sample_image"]
