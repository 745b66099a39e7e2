"""The built-in classifier the SAE tests splice into and cache from."""

from __future__ import annotations

import pytest

import prisma_ext as px


@pytest.fixture(scope="module")
def model():
    return px.load("builtin:shapes-vit")
