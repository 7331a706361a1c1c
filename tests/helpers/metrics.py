"""Random gt boxes and proposals jittered from them, for the recall-metric tests."""

from __future__ import annotations

import torch


def random_boxes(
    n: int, gen: torch.Generator, size: float = 320.0, max_wh: float = 200.0
) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * max_wh + 2.0
    return torch.cat([xy, xy + wh], dim=1)


def jitter(boxes: torch.Tensor, gen: torch.Generator, scale: float) -> torch.Tensor:
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + (torch.rand(boxes.shape, generator=gen) - 0.5) * scale * wh


def random_image(
    gen: torch.Generator, max_gt: int, max_props: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """gt boxes of mixed sizes; proposals mostly jittered copies of them (IoUs >= 0.5 occur)."""
    num_gt = int(torch.randint(0, max_gt + 1, (1,), generator=gen))
    num_props = int(torch.randint(0, max_props + 1, (1,), generator=gen))
    gt = random_boxes(num_gt, gen)
    if num_gt and num_props:
        src = gt[torch.randint(0, num_gt, (num_props,), generator=gen)]
        props = jitter(src, gen, 0.3)
        noise = torch.rand(num_props, generator=gen) < 0.3
        props[noise] = random_boxes(int(noise.sum()), gen)
    else:
        props = random_boxes(num_props, gen)
    return props, gt
