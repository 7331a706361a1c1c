"""adaptive_conv2d against torchvision's deform_conv2d: outputs and gradients, edges, dtypes."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d

from lightning_rpn.core.adaptive_conv import adaptive_conv2d


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 1), (3, 2, 1, 6), (1, 4, 5, 1)],
                         ids=["map", "one_pixel", "one_row", "one_column"])
def test_equals_deform_conv2d_with_gradients(shape) -> None:
    # offsets of +-6 px put many points outside the map (zero there, partly at the edge)
    generator = torch.Generator().manual_seed(sum(shape))
    batch, channels, height, width = shape
    feature = torch.randn(*shape, generator=generator, dtype=torch.float64)
    offsets = 3 * torch.randn(batch, 18, height, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, channels, 3, 3, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, generator=generator, dtype=torch.float64)
    results = []
    for conv in (lambda *a: deform_conv2d(*a, padding=(1, 1)), adaptive_conv2d):
        leaves = [t.clone().requires_grad_() for t in (feature, weight, bias)]
        out = conv(leaves[0], offsets, leaves[1], leaves[2])
        results.append([out, *torch.autograd.grad(out.square().sum(), leaves)])
    for theirs, ours in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_integer_offsets_read_the_shifted_pixels() -> None:
    # every point moved by (dy, dx) = (1, 2): the centre tap of location (y, x) reads (y + 1, x + 2)
    image = torch.arange(30.0).reshape(1, 1, 5, 6)
    offsets = torch.tensor([1.0, 2.0]).repeat(9).reshape(1, 18, 1, 1).expand(1, 18, 5, 6)
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 1, 1] = 1.0
    out = adaptive_conv2d(image, offsets, weight)[0, 0]
    torch.testing.assert_close(out[:4, :4], image[0, 0, 1:, 2:])
    assert out[4].eq(0).all() and out[:, 4:].eq(0).all()  # read outside the map: zero


def test_half_precision_samples_in_float32() -> None:
    generator = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 4, 8, 8, generator=generator)
    offsets = torch.randn(2, 18, 8, 8, generator=generator)
    weight = torch.randn(3, 4, 3, 3, generator=generator)
    expected = deform_conv2d(feature, offsets, weight, padding=(1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = adaptive_conv2d(feature.bfloat16(), offsets, weight)
    plain = adaptive_conv2d(feature.bfloat16(), offsets, weight.bfloat16())
    for out in (mixed, plain):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_shape_errors_name_the_expected_shape() -> None:
    feature = torch.zeros(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"weight must be \[O, 4, 3, 3\]"):
        adaptive_conv2d(feature, torch.zeros(1, 18, 5, 5), torch.zeros(2, 4, 1, 1))
    with pytest.raises(ValueError, match=r"offsets must be \[1, 18, 5, 5\]"):
        adaptive_conv2d(feature, torch.zeros(1, 18, 4, 5), torch.zeros(2, 4, 3, 3))
