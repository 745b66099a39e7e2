"""Sparse autoencoders over a site's activations: the dictionary (`SparseAutoencoder`, SAELens's
parameters, math and hook names) and SAELens's on-disk layout (`save_saelens`, `load_saelens`)."""

from .dictionary import ARCHITECTURES, SparseAutoencoder
from .formats import load_saelens, save_saelens

__all__ = ["ARCHITECTURES", "SparseAutoencoder", "load_saelens", "save_saelens"]
