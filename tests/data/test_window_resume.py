"""Tiled training resumed on another number of processes: the windows each rank takes after a checkpoint
(``WindowSampler`` with ``done``), what a checkpoint records (``WindowProgress``), and the warning when
Lightning's count of the epoch's batches cannot hold exactly the windows left. No processes are spawned:
ranks are samplers side by side, the trainer's batch count is given as Lightning keeps it (the batches
restored from the checkpoint, then one more per batch); ``tests/training/test_ddp_tiles.py`` runs two."""

from __future__ import annotations

import pytest

from lightning_rpn.data.window_sampler import WindowProgress, WindowSampler, batches_for

PER_EPOCH, BATCH = 12, 2


def _ranks(world_size: int, done: int, epoch: int = 0) -> list[list[int]]:
    """Each rank's window indices of ``epoch`` when ``done`` of its windows are trained."""
    samplers = [WindowSampler(PER_EPOCH, world_size, rank, done=lambda e: done if e == epoch else 0)
                for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


def _trained(ranks: list[list[int]], batches: int) -> list[int]:
    """The windows ``batches`` batches of every rank hold."""
    return [i for share in ranks for i in share[:batches * BATCH]]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("done", [0, 4, 7, 12])
def test_the_ranks_share_exactly_the_windows_left(world_size: int, done: int) -> None:
    ranks = _ranks(world_size, done, epoch=2)
    assert len({len(share) for share in ranks}) == 1, "ranks stay in step"
    windows = _trained(ranks, len(ranks[0]))
    assert set(windows) >= set(range(2 * PER_EPOCH + done, 3 * PER_EPOCH))
    assert len(windows) - (PER_EPOCH - done) < world_size, "the rest is padding (as in a whole epoch)"
    whole = _ranks(world_size, 0, epoch=2)
    assert all(share == full[done // world_size:] for share, full in zip(ranks, whole) if done % world_size == 0), \
        "on the same number of processes: the rest of the uninterrupted epoch"
    assert len(WindowSampler(PER_EPOCH, world_size, 0, done=lambda e: done)) == -(-PER_EPOCH // world_size)


def _save(world_size: int, batches: int) -> dict:
    """The checkpoint state after ``batches`` batches of epoch 0 on every one of ``world_size`` ranks."""
    progress = WindowProgress(PER_EPOCH)
    assert progress.begin(0) == 0 and progress.first_batch(0, BATCH, world_size) is None
    return progress.state(batches, BATCH, world_size, epoch_over=False)


@pytest.mark.parametrize(("saved_on", "resumed_on", "batches"), [(2, 1, 1), (2, 1, 2), (3, 2, 1), (1, 2, 1), (1, 2, 2)])
def test_a_resumed_epoch_trains_each_window_left_once_on_any_number_of_processes(
    saved_on: int, resumed_on: int, batches: int
) -> None:
    before = _trained(_ranks(saved_on, 0), batches)
    state = _save(saved_on, batches)
    assert state == {"epoch": 0, "done": batches * BATCH * saved_on, "finished": False}  # was batches * B at W_new
    progress = WindowProgress(PER_EPOCH, *WindowProgress.resume_position(state))
    after = [list(WindowSampler(PER_EPOCH, resumed_on, rank, done=progress.begin)) for rank in range(resumed_on)]
    message = progress.first_batch(batches, BATCH, resumed_on)  # Lightning restores this rank's count
    ours = batches_for(PER_EPOCH - state["done"], BATCH, resumed_on)
    lightning = batches_for(PER_EPOCH, BATCH, resumed_on) - batches  # it ends the epoch at len(loader) batches
    trained = _trained(after, min(ours, lightning))
    assert set(before).isdisjoint(trained) and len(set(trained)) > len(trained) - resumed_on, "only padding repeats"
    if ours <= lightning:
        assert set(before) | set(trained) == set(range(PER_EPOCH))
        assert (message is None) == (ours == lightning)
    else:  # more windows left than Lightning has batches for: the last ones are skipped, and said so
        first_skipped = state["done"] + lightning * BATCH * resumed_on
        assert set(range(PER_EPOCH)) - set(before) - set(trained) == set(range(first_skipped, PER_EPOCH))
        assert f"from window {first_skipped}) are not trained" in message
    # a second checkpoint inside the resumed epoch counts on from the first, at the new world size
    assert progress.done(batches + 1, BATCH, resumed_on) == min(PER_EPOCH, state["done"] + BATCH * resumed_on)
    assert progress.state(batches + ours, BATCH, resumed_on, epoch_over=False)["finished"]


def test_the_next_epoch_starts_whole_and_a_finished_epoch_resumes_at_the_next() -> None:
    state = {"epoch": 3, "done": PER_EPOCH, "finished": True}
    assert WindowProgress.resume_position(state) == (4, 0)
    assert WindowProgress.resume_position({"epoch": 3, "done": 5, "finished": True}) == (4, 0)  # limit_train_batches
    progress = WindowProgress(PER_EPOCH, 3, 5)
    assert progress.begin(3) == 5 and progress.begin(4) == 0 and progress.begin(4) == 0
    assert progress.state(0, BATCH, 2, epoch_over=False) == {"epoch": 4, "done": 0, "finished": False}


def test_a_resume_at_another_world_size_says_what_lightning_will_do() -> None:
    same = WindowProgress(PER_EPOCH, 0, 4)
    assert same.first_batch(2, BATCH, 1) is None, "same processes: the rest fits Lightning's count"
    assert same.first_batch(0, BATCH, 1) is None, "asked once per epoch"
    fewer = WindowProgress(PER_EPOCH, 0, 8)  # 2 processes x 2 batches trained; resumed on 1, which counts 2 of 6
    message = fewer.first_batch(2, BATCH, 1)
    assert "epoch 0 was resumed with 8 of its 12 windows trained" in message
    assert "trains the 4 windows left in 2 batches per process" in message and "does not validate" in message
    more = WindowProgress(PER_EPOCH, 0, 4)  # 1 process x 2 batches; resumed on 2, which count 2 of 3 done
    message = more.first_batch(2, BATCH, 2)
    assert batches_for(PER_EPOCH - 4, BATCH, 2) == 2
    assert "Lightning runs only 1 batch more of it per process" in message
    assert "its last 4 windows (from window 8) are not trained" in message
