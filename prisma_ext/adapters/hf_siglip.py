"""Hugging Face SigLIP / SigLIP 2 / AIMv2 / MetaCLIP 2 / CLIP variants (being written)."""

ADAPTERS: list = []
