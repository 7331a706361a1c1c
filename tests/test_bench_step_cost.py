"""bench/bench_step_cost.py: its crops span epochs, and its memory figures read this process."""

from __future__ import annotations

import pytest
from helpers.scripts import load_script


@pytest.fixture(scope="module")
def step_cost():
    return load_script("bench/bench_step_cost.py", "bench_step_cost")


class TwoBatchEpochs:
    """A data module whose epoch is two batches, as the dense scenes' is."""

    def train_dataloader(self):
        return iter(["first", "second"])


def test_the_timed_crops_come_from_as_many_epochs_as_needed(step_cost) -> None:
    assert step_cost.training_batches(TwoBatchEpochs(), 5) == ["first", "second", "first", "second", "first"]


def test_memory_fields_are_read_in_megabytes(step_cost) -> None:
    resident, peak = step_cost._status_mb("VmRSS"), step_cost._status_mb("VmHWM")
    assert 10 < resident <= peak
    with pytest.raises(KeyError):
        step_cost._status_mb("NoSuchField")

