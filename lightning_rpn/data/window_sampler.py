"""The sampler of training: the item indices of the epoch Lightning sets, this rank's share.

Item ``epoch * per_epoch + i`` of a :class:`~lightning_rpn.data.tiles.TiledDataset` is window
``i`` of ``epoch``, of a :class:`~lightning_rpn.data.draws.ShuffledEpochs` the ``i``-th image of
the epoch's order (the docs below say "windows" for both); :class:`WindowSampler` hands the
DataLoader the indices of the current epoch (``set_epoch``, called by the trainer before each
epoch's first batch, also with persistent workers), so no shuffling is needed: the index is the draw.

Ranks take the windows by stride (rank ``r`` of ``W``: ``i = r, r + W, ...``) and stay in step,
so after ``b`` batches of ``B`` windows on every rank the epoch's first ``b * B * W`` windows are
trained, whatever ``W``: a prefix. :class:`WindowProgress` counts that prefix as training goes
(what a checkpoint keeps), and a run resumed inside an epoch, on any number of processes, goes on
with the windows after it (``done``), not with the epoch's first ones again; the training
DataLoader is a :class:`ResumableLoader`, which says so to Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler, Sampler, SequentialSampler

__all__ = ["OverfitWindowSampler", "ResumableLoader", "WindowSampler", "WindowProgress", "drop_empty_loader_states"]


class WindowSampler(DistributedSampler):
    """The indices ``epoch * per_epoch + i`` of the epoch set by :meth:`set_epoch`, this rank's share.

    Process ``rank`` of ``num_replicas`` takes ``i = done + rank, done + rank + num_replicas,
    ...``, every rank the same count (a few windows repeat, from the epoch's first, when
    ``num_replicas`` does not divide what is left, so DDP ranks stay in step). A
    ``DistributedSampler`` so that Lightning keeps it under DDP instead of wrapping it (a wrapper
    would not pass ``set_epoch`` on).

    A pass that no ``set_epoch`` came before (a training loop of one's own iterating the loader
    again) draws the next epoch, as a shuffling sampler would draw a new order.

    ``done(epoch)`` (asked as an epoch's iteration starts) says how many of the epoch's first
    windows are already trained, all ranks together: a run resumed from a checkpoint saved
    inside the epoch skips them. ``len()`` stays the whole epoch's share, which Lightning counts
    the epoch's batches from.
    """

    def __init__(self, per_epoch: int, num_replicas: int = 1, rank: int = 0,
                 done: Callable[[int], int] | None = None) -> None:
        # DistributedSampler.__init__ wants a dataset and a process group; nothing of it is used
        Sampler.__init__(self)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"WindowSampler: rank={rank} must be in [0, num_replicas={num_replicas})")
        self.per_epoch, self.num_replicas, self.rank, self.epoch = per_epoch, num_replicas, rank, 0
        self.num_samples = -(-per_epoch // num_replicas)
        self.done = done
        self._epoch_set = True  # the first pass draws epoch 0 (or the one set before it)

    def set_epoch(self, epoch: int) -> None:
        """Draw the windows of ``epoch`` next (Lightning calls this before every training epoch)."""
        self.epoch, self._epoch_set = int(epoch), True

    def __iter__(self) -> Iterator[int]:
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        done = 0 if self.done is None else min(max(0, self.done(self.epoch)), self.per_epoch)
        count = -(-(self.per_epoch - done) // self.num_replicas)
        start = self.epoch * self.per_epoch
        return iter([start + (done + self.rank + k * self.num_replicas) % self.per_epoch for k in range(count)])

    def __len__(self) -> int:
        return self.num_samples


class OverfitWindowSampler(WindowSampler, SequentialSampler):
    """The :class:`WindowSampler` of ``Trainer(overfit_batches=...)``, which Lightning keeps as the
    ``SequentialSampler`` it asks for there.

    Lightning replaces any other training sampler with one over ``range(len(dataset))``: the
    indices of epoch 0 at every epoch, so every draw keyed by the index (each image's augmentation)
    repeated epoch 0's. The data module serves these indices from
    :class:`~lightning_rpn.data.draws.SameItems`: the same items in the same order every epoch, as
    Lightning wants, each epoch with draws of its own.
    """


class ResumableLoader(DataLoader):
    """The training DataLoader of a :class:`WindowSampler` whose position a checkpoint keeps.

    Lightning takes a training loader with ``state_dict`` / ``load_state_dict`` for resumable
    and warns, on a resume inside an epoch, about any other ("your dataloader is not resumable").
    This one is: the data module's checkpoint state (``draws``, :class:`WindowProgress`) holds where
    the epoch stands and the sampler goes on from there, so these two methods hold nothing. A
    loader of one's own that is not resumable, in the same process or the same fit, still warns.
    """

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the data module's ``draws`` state holds the epoch's position."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the data module's ``draws`` state restores the epoch's position."""


def drop_empty_loader_states(checkpoint: dict[str, Any]) -> None:
    """Leave out of ``checkpoint``, in place, Lightning's training-loader states when every one is
    empty (a :class:`ResumableLoader`'s): they restore nothing, and a checkpoint holding them could
    not be resumed with a training loader that is not resumable (Lightning wants as many resumable
    loaders as states), nor by a lightning-rpn from before :class:`ResumableLoader`."""
    fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    states = fit_state.get("combined_loader")
    if states is not None and not any(states):
        del fit_state["combined_loader"]


def batches_for(windows: int, batch_size: int, num_replicas: int, drop_last: bool = False) -> int:
    """Batches each of ``num_replicas`` ranks takes to train ``windows`` windows by stride (the full
    ones alone with ``drop_last``)."""
    per_rank = -(-windows // num_replicas)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def _batches(count: int) -> str:
    """``"1 batch"``, ``"2 batches"``."""
    return f"{count} batch" if count == 1 else f"{count} batches"


class WindowProgress:
    """The windows tiled training has trained, all ranks together: the first ``done(...)`` of ``epoch``.

    Created with the position training starts from (``epoch``, ``start`` windows of it done: a
    checkpoint's :meth:`state`, see :meth:`resume_position`); ``unit`` names the items and what
    sets their number in its warnings, ``drop_last`` is the loader's. :meth:`begin` is the sampler's
    ``done``; :meth:`first_batch` takes the trainer's count of the epoch's batches as its first
    batch of this run comes (a resumed epoch's count starts at the batches restored), so that
    :meth:`done` follows from the trainer's count of batches trained since, at today's world size.
    """

    def __init__(self, per_epoch: int, epoch: int = 0, start: int = 0,
                 unit: tuple[str, str] = ("window", "data.tiles.per_epoch"), drop_last: bool = False) -> None:
        self.per_epoch, self.epoch, self.start = per_epoch, epoch, start
        self.unit, self.drop_last = unit, drop_last
        self.first: int | None = None  # the trainer's batch count before this epoch's first batch of this run

    def begin(self, epoch: int) -> int:
        """Windows of ``epoch`` already trained as the sampler starts it: the start position's for its epoch, else 0."""
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0
        self.first = None
        return self.start

    def first_batch(self, batches: int, batch_size: int, num_replicas: int) -> str | None:
        """Record ``batches`` (the trainer's count before this epoch's first batch of this run);
        when it is a resumed epoch whose rest is not the trainer's rest of ``len(loader)`` batches
        (the checkpoint came from another number of processes), what happens, else ``None``."""
        if self.first is not None:
            return None
        self.first = batches
        left = self.per_epoch - self.start
        if not self.start or not left:
            return None
        ours = batches_for(left, batch_size, num_replicas, self.drop_last)
        whole = batches_for(self.per_epoch, batch_size, num_replicas, self.drop_last)
        theirs = max(whole - batches, 1)  # Lightning ends the epoch at its length (after one batch when past it)
        if ours == theirs:
            return None
        noun, source = self.unit
        where = (f"epoch {self.epoch} was resumed with {self.start} of its {self.per_epoch} {noun}s trained "
                 f"({source}), but the trainer counts {_batches(batches)} of its {whole} per process "
                 "done (the checkpoint was saved on another number of processes or with another batch size)")
        if ours < theirs:
            return (f"{where}: it trains the {left} {noun}s left in {_batches(ours)} per process and ends there, "
                    f"{_batches(theirs - ours)} short of Lightning's count, so Lightning does not validate at this "
                    "epoch's end (the next epochs are whole)")
        skipped = left - theirs * batch_size * num_replicas
        return (f"{where}: Lightning runs only {_batches(theirs)} more of it per process, so its last "
                f"{skipped} {noun}s (from {noun} {self.per_epoch - skipped}) are not trained; resume "
                "with the checkpoint's number of processes and data.batch_size, or from a checkpoint saved at an "
                "epoch's end, to train them all")

    def done(self, batches: int, batch_size: int, num_replicas: int) -> int:
        """Windows of :attr:`epoch` trained once the trainer counts ``batches`` of it (at most ``per_epoch``)."""
        trained = 0 if self.first is None else max(batches - self.first, 0) * batch_size * num_replicas
        return min(self.start + trained, self.per_epoch)

    def state(self, batches: int, batch_size: int, num_replicas: int, epoch_over: bool) -> dict[str, Any]:
        """What a checkpoint keeps: the epoch, its windows trained, and whether the trainer ended it."""
        done = self.done(batches, batch_size, num_replicas)
        return {"epoch": self.epoch, "done": done, "finished": bool(epoch_over or done >= self.per_epoch)}

    @staticmethod
    def resume_position(state: dict[str, Any]) -> tuple[int, int]:
        """``(epoch, windows done)`` a run resumed from :meth:`state` starts at (the next epoch's start
        when that epoch was over)."""
        epoch, done = int(state["epoch"]), int(state["done"])
        return (epoch + 1, 0) if state["finished"] else (epoch, done)
