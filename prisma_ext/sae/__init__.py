"""Sparse autoencoders over a site's activations: the dictionary (`SparseAutoencoder`, SAELens's
parameters, math and hook names), SAELens's on-disk layout (`save_saelens`, `load_saelens`) and
ViT-Prisma's released checkpoints (`load_vit_prisma`), and `splice`: an SAE at its site in a
hooked model, its latents readable and editable by name; `cache_activations` / `ActivationStore`:
a site's activations over images in resumable safetensors shards; `train_topk`: a seeded,
resumable TopK SAE with the AuxK loss for dead latents; `downstream`: agreement, accuracy and KL
recovered when the SAE replaces its site."""

from .dictionary import ARCHITECTURES, SparseAutoencoder
from .downstream import downstream
from .formats import load_saelens, save_saelens
from .prisma_format import load_vit_prisma
from .splice import splice
from .store import ActivationStore, cache_activations
from .train import evaluate, train_sae, train_topk

__all__ = ["ARCHITECTURES", "ActivationStore", "SparseAutoencoder", "cache_activations", "load_saelens",
           "load_vit_prisma", "save_saelens", "splice", "evaluate", "train_sae", "train_topk", "downstream"]
