"""Shared test set-up. Builders of small random models and the reference patcher live in
`tests.support` (imported as a package: `from tests.support.models import small_timm`); the
cached objects many tests share are fixtures here."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def analysis_pair():
    """`pair(variant, batch=3)`: a small timm ViT on both backends with images (cached)."""
    from tests.support.pairs import pair

    return pair
