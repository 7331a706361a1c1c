"""A user's own backbone class for the tests, importable by class_path (``backbone_probes.ProbeFPN``).

Not collected by pytest (no ``test_`` prefix). Subprocess CLI runs find it with ``PYTHONPATH``
set to this folder (``helpers.cli.PROBES``); in-process tests import ``helpers.backbone_probes``.
"""

from __future__ import annotations

from torch import Tensor, nn


class ProbeFPN(nn.Module):
    """Four levels of stride-2 convolutions: strides 4, 8, 16, 32 and ``width`` channels.

    ``declared_strides`` replaces what the module states as its ``strides`` (to test the check
    that compares them with the feature maps).
    """

    def __init__(self, width: int = 8, declared_strides: list[int] | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU()) for _ in range(3)
        )
        self.out_channels = width
        self.strides = tuple(declared_strides) if declared_strides is not None else (4, 8, 16, 32)
        self.size_divisibility = max(self.strides)

    def forward(self, images: Tensor) -> list[Tensor]:
        feature = self.stem(images)
        features = [feature]
        for layer in self.down:
            feature = layer(feature)
            features.append(feature)
        return features
