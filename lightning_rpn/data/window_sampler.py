"""The sampler of tiled training: the window indices of the epoch Lightning sets, this rank's share.

Item ``epoch * per_epoch + i`` of a :class:`~lightning_rpn.data.tiles.TiledDataset` is window
``i`` of ``epoch``; :class:`WindowSampler` hands the DataLoader the indices of the current
epoch (``set_epoch``, called by the trainer before each epoch's first batch, also with
persistent workers), so no shuffling is needed: the index is the draw. A run resumed inside an
epoch goes on with that epoch's windows it had not trained (``done``), not with its first ones
again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch.utils.data import DistributedSampler, Sampler

__all__ = ["WindowSampler"]


class WindowSampler(DistributedSampler):
    """The indices ``epoch * per_epoch + i`` of the epoch set by :meth:`set_epoch`, this rank's share.

    Process ``rank`` of ``num_replicas`` takes ``i = rank, rank + num_replicas, ...``, every
    rank the same count (a few windows repeat when ``num_replicas`` does not divide
    ``per_epoch``, so DDP ranks stay in step). A ``DistributedSampler`` so that Lightning keeps
    it under DDP instead of wrapping it (a wrapper would not pass ``set_epoch`` on).

    ``done`` (read as an epoch's iteration starts) says how many of this rank's windows of the
    epoch are already trained: a run resumed from a checkpoint saved inside the epoch skips them.
    """

    def __init__(self, per_epoch: int, num_replicas: int = 1, rank: int = 0,
                 done: Callable[[], int] | None = None) -> None:
        # DistributedSampler.__init__ wants a dataset and a process group; nothing of it is used
        Sampler.__init__(self)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"WindowSampler: rank={rank} must be in [0, num_replicas={num_replicas})")
        self.per_epoch, self.num_replicas, self.rank, self.epoch = per_epoch, num_replicas, rank, 0
        self.num_samples = -(-per_epoch // num_replicas)
        self.done = done

    def set_epoch(self, epoch: int) -> None:
        """Draw the windows of ``epoch`` next (Lightning calls this before every training epoch)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.per_epoch
        skip = 0 if self.done is None else max(0, self.done())
        return iter([start + (self.rank + k * self.num_replicas) % self.per_epoch
                     for k in range(skip, self.num_samples)])

    def __len__(self) -> int:
        return self.num_samples
