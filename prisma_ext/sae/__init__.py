"""Sparse autoencoders over a site's activations: the dictionary (`SparseAutoencoder`, SAELens's
parameters, math and hook names), SAELens's on-disk layout (`save_saelens`, `load_saelens`) and
ViT-Prisma's released checkpoints (`load_vit_prisma`), and `splice`: an SAE at its site in a
hooked model, its latents readable and editable by name."""

from .dictionary import ARCHITECTURES, SparseAutoencoder
from .formats import load_saelens, save_saelens
from .prisma_format import load_vit_prisma
from .splice import splice

__all__ = ["ARCHITECTURES", "SparseAutoencoder", "load_saelens", "load_vit_prisma", "save_saelens", "splice"]
