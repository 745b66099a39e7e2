"""Hugging Face DINOv2 / DINOv2 with registers / DINOv3 / DeiT (being written)."""

ADAPTERS: list = []
