"""Sparse autoencoders over a site's activations: the dictionary (`SparseAutoencoder`, SAELens's
parameters, math and hook names), SAELens's on-disk layout (`save_saelens`, `load_saelens`) and
ViT-Prisma's released checkpoints (`load_vit_prisma`)."""

from .dictionary import ARCHITECTURES, SparseAutoencoder
from .formats import load_saelens, save_saelens
from .prisma_format import load_vit_prisma

__all__ = ["ARCHITECTURES", "SparseAutoencoder", "load_saelens", "load_vit_prisma", "save_saelens"]
