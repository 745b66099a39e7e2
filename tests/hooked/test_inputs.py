"""Bad images get one clear error naming what was expected and what came."""

import pytest
import torch

import prisma_ext as px
from prisma_ext.errors import InputError
from tests.support.models import images_for, small_timm


@pytest.fixture(scope="module")
def model():
    return px.load(small_timm("plain"))


@pytest.mark.parametrize("images, message", [
    (torch.randn(2, 1, 32, 32), "expected 3 channels, got 1"),
    (torch.randn(2, 32, 32, 3), "channels last"),
    (torch.randn(2, 3, 48, 48), "expected images of 32x32 .* got 48x48"),
    (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "floating-point"),
    (torch.randn(3, 32, 32), r"add a batch axis"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
    ([[1.0]], "torch.Tensor"),
])
def test_bad_images(model, images, message):
    with pytest.raises(InputError, match=message):
        model(images)


def test_bad_input_leaves_no_hook_attached(model):
    with pytest.raises(InputError):
        model.run_with_cache(torch.randn(1, 3, 16, 16))
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values()) and not model.is_caching


def test_dynamic_model_wants_multiples_of_the_patch():
    src = small_timm("plain", dynamic_img_size=True)
    hooked = px.load(src)
    with pytest.raises(InputError, match="multiple of the patch size 8x8"):
        hooked(images_for(src, size=(30, 32)))


def test_errors_are_value_errors():
    assert issubclass(InputError, ValueError)
