"""The cascade's adaptive 3x3 convolution: bilinear samples at given points, then one matrix product.

Shapes: ``B`` images, ``C`` input and ``O`` output channels, ``H x W`` the feature map (stride 1,
so the output's size too), ``K = 9`` the points of a 3x3 kernel, ``P = H * W`` locations.

:func:`adaptive_conv2d` computes what ``torchvision.ops.deform_conv2d(feature, offsets, weight,
bias, padding=(1, 1))`` computes (no mask, stride and dilation 1): kernel point ``k = 3 (i + 1) +
j + 1`` of location ``(y, x)`` reads the feature bilinearly at ``(y + i + dy_k, x + j + dx_k)``,
zero outside the map, and the output is the sum over points and channels times the weight.
It gathers all ``K`` samples of every location with one ``grid_sample`` (``[B, C * K, P]``)
and contracts them with the weight in one batched matrix product, the im2col form of a convolution.
Why not ``deform_conv2d`` itself: on the CPU its kernels loop over every sample in C++, and
its forward + backward pass is 4.9x (256 channels) to 12x (32 channels) slower than this
(``bench/bench_adaptive_conv.py``), where the cascade spent most of its step. The sampling runs in float32 (or float64) whatever the
feature's dtype, as torchvision's autocast rule for ``deform_conv2d`` does: sub-pixel positions
in half precision would move the samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["adaptive_conv2d"]


def adaptive_conv2d(feature: Tensor, offsets: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``[B, C, H, W]`` features, ``[B, 2K, H, W]`` offsets (``(dy, dx)`` per point), ``[O, C, 3, 3]`` -> ``[B, O, H, W]``."""
    batch, channels, height, width = feature.shape
    if weight.shape[1:] != (channels, 3, 3):
        raise ValueError(f"adaptive_conv2d: weight must be [O, {channels}, 3, 3], got {tuple(weight.shape)}")
    if offsets.shape != (batch, 18, height, width):
        raise ValueError(f"adaptive_conv2d: offsets must be [{batch}, 18, {height}, {width}], got {tuple(offsets.shape)}")
    dtype = torch.promote_types(feature.dtype, torch.float32)
    offsets = offsets.to(dtype)
    ys = torch.arange(height, device=feature.device, dtype=dtype).reshape(height, 1)
    xs = torch.arange(width, device=feature.device, dtype=dtype).reshape(1, width)
    taps = [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)]  # point k = 3 (i + 1) + j + 1
    # [B, K * H, W] feature pixels, the points stacked along the rows (cat, not a reshape: an
    # exported program would need a guard on symbolic sizes for the reshape)
    points_y = torch.cat([ys + i + offsets[:, 2 * k] for k, (i, _) in enumerate(taps)], dim=1)
    points_x = torch.cat([xs + j + offsets[:, 2 * k + 1] for k, (_, j) in enumerate(taps)], dim=1)
    # grid_sample's coordinates with align_corners=False: pixel p of n is (2 p + 1) / n - 1
    grid = torch.stack(((2 * points_x + 1) / width - 1, (2 * points_y + 1) / height - 1), dim=-1)
    samples = F.grid_sample(feature.to(dtype), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # [B, C, K * H, W]
    # row c * K + k, the weight's order
    columns = samples.unflatten(2, (9, height)).flatten(1, 2).flatten(2, 3)  # [B, C * K, P]
    # one bmm over the batch with the weight broadcast (a stride-0 view): torch.matmul of a 2-D
    # weight with 3-D columns folds the batch into the rows, which transposes (copies) the
    # columns forward and backward
    kernel = weight.reshape(weight.shape[0], channels * 9).to(dtype)
    out = torch.bmm(kernel.expand(batch, -1, -1), columns)  # [B, O, P]
    if bias is not None:
        out = out + bias.to(out.dtype).reshape(1, -1, 1)
    return out.reshape(batch, -1, height, width).to(feature.dtype)
