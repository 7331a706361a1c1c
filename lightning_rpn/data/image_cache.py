"""A least-recently-used store of decoded samples, bounded by the bytes of their images.

:class:`~lightning_rpn.data.tiles.TiledDataset` keeps one per process, so that the windows cut
from a few large images decode each image once (``data.tiles.cache_mb``).
"""

from __future__ import annotations

from collections import OrderedDict

from lightning_rpn.data.sample import DetectionSample

__all__ = ["ImageCache"]


class ImageCache:
    """Least-recently-used samples, bounded by the bytes of their images (one per process)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._items: OrderedDict[int, DetectionSample] = OrderedDict()

    def get(self, key: int) -> DetectionSample | None:
        sample = self._items.get(key)
        if sample is not None:
            self._items.move_to_end(key)
        return sample

    def put(self, key: int, sample: DetectionSample) -> None:
        """Keep ``sample`` (evicting the oldest), unless its image alone exceeds the budget."""
        size = int(sample.image.nbytes)
        if size > self.max_bytes or key in self._items:
            return
        while self._items and self.bytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= int(old.image.nbytes)
        self._items[key] = sample
        self.bytes += size

    def __len__(self) -> int:
        return len(self._items)
