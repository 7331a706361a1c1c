"""BoxCoder: parity with torchvision's det_utils.BoxCoder, clamping, fp32 under autocast."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection import _utils as det_utils

from lightning_rpn.core.box_coder import BoxCoder


def _boxes(n: int, seed: int, scale: float = 500.0, min_size: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * scale
    wh = torch.rand(n, 2, generator=g) * scale / 2 + min_size
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_and_decode_match_torchvision(weights: tuple[float, ...]) -> None:
    anchors, gt = _boxes(300, 0), _boxes(300, 1)
    ours, theirs = BoxCoder(weights), det_utils.BoxCoder(weights)
    deltas = ours.encode(gt, anchors)
    torch.testing.assert_close(deltas, theirs.encode_single(gt, anchors), rtol=1e-5, atol=1e-5)
    predicted = torch.randn(300, 4) * 2
    decoded = ours.decode(predicted, anchors)
    torch.testing.assert_close(decoded, theirs.decode_single(predicted, anchors), rtol=1e-5, atol=1e-5)


def test_decode_inverts_encode() -> None:
    # Sizes within a factor 1000/16 of each other, so the clamp does not apply.
    anchors, gt = _boxes(200, 2, min_size=20.0), _boxes(200, 3, min_size=20.0)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(coder.decode(coder.encode(gt, anchors), anchors), gt, rtol=1e-5, atol=1e-3)


def test_encode_follows_the_source_parametrisation() -> None:
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    box = torch.tensor([[5.0, 10.0, 25.0, 50.0]])
    t = BoxCoder().encode(box, anchor)[0]
    # centres (5, 10) -> (15, 30); sizes (10, 20) -> (20, 40)
    torch.testing.assert_close(t, torch.tensor([1.0, 1.0, math.log(2.0), math.log(2.0)]))


def test_decode_clamps_log_sizes_before_exp() -> None:
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    coder = BoxCoder(clamp=math.log(1000.0 / 16))
    box = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 1e4]]), anchor)[0]
    assert torch.isfinite(box).all()
    torch.testing.assert_close(box[2] - box[0], torch.tensor(1000.0), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(box[3] - box[1], torch.tensor(1000.0), rtol=1e-5, atol=1e-3)
    shrunk = coder.decode(torch.tensor([[0.0, 0.0, -2.0, -2.0]]), anchor)[0]
    torch.testing.assert_close(shrunk[2] - shrunk[0], torch.tensor(16 * math.exp(-2.0)))


def test_math_stays_fp32_under_bf16_autocast() -> None:
    anchors, gt = _boxes(100, 4), _boxes(100, 5)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    deltas = torch.randn(100, 4)
    expected_enc = coder.encode(gt, anchors)
    expected_dec = coder.decode(deltas, anchors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # A matmul proves autocast is really active here.
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        enc = coder.encode(gt, anchors)
        dec = coder.decode(deltas, anchors)
        enc_bf16 = coder.encode(gt.bfloat16(), anchors.bfloat16())
    assert enc.dtype == dec.dtype == enc_bf16.dtype == torch.float32
    assert torch.equal(enc, expected_enc) and torch.equal(dec, expected_dec)
    assert torch.equal(enc_bf16, coder.encode(gt.bfloat16().float(), anchors.bfloat16().float()))


def test_leading_dimensions_broadcast_over_images() -> None:
    anchors = _boxes(50, 6)
    deltas = torch.randn(3, 50, 4)
    coder = BoxCoder()
    batched = coder.decode(deltas, anchors)
    assert batched.shape == (3, 50, 4)
    assert torch.equal(batched[1], coder.decode(deltas[1], anchors))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [(dict(weights=(1.0, 1.0, 1.0)), "4 positive numbers"), (dict(weights=(1.0, 0.0, 1.0, 1.0)), "4 positive")],
)
def test_invalid_weights(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        BoxCoder(**kwargs)


def test_wrong_last_dimension_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"BoxCoder.decode\(deltas\): expected shape \[..., 4\], got \(5, 3\)"):
        BoxCoder().decode(torch.zeros(5, 3), torch.zeros(5, 4))


def test_row_counts_that_do_not_broadcast_are_named() -> None:
    """torch's "The size of tensor a (5) must match ..." named neither argument."""
    with pytest.raises(ValueError, match=r"BoxCoder.encode: boxes \(5, 4\) and anchors \(3, 4\) do not broadcast"):
        BoxCoder().encode(torch.ones(5, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"BoxCoder.decode: deltas \(2, 5, 4\) and anchors \(3, 4\) do not broadcast"):
        BoxCoder().decode(torch.zeros(2, 5, 4), torch.ones(3, 4))
    assert BoxCoder().decode(torch.zeros(2, 3, 4), torch.ones(3, 4)).shape == (2, 3, 4)  # broadcasting still works
