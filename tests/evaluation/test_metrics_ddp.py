"""ProposalRecall across 2 CPU processes (gloo): merged results equal one process on all data."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_rpn.evaluation.metrics import ProposalRecall

from helpers.metrics import random_image

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

WORLD_SIZE = 2
NUM_IMAGES = 24
MAX_PROPOSALS = (5, 20, 60)


def make_data() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    images = [random_image(gen, 10, 60) for _ in range(NUM_IMAGES)]
    return [p for p, _ in images], [g for _, g in images]


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        torch.set_num_threads(1)
        proposals, gts = make_data()
        metric = ProposalRecall(max_proposals=MAX_PROPOSALS)
        # uneven split and two updates per rank: rank 0 takes images 0..9, rank 1 takes 10..23
        mine = range(0, 10) if rank == 0 else range(10, NUM_IMAGES)
        half = len(mine) // 2
        for chunk in (list(mine)[:half], list(mine)[half:]):
            metric.update([proposals[i] for i in chunk], [gts[i] for i in chunk])
        local_boxes = int(metric.num_boxes[0])
        values = {key: float(v) for key, v in metric.compute().items()}
        curves = metric.curves()
        torch.save(
            {
                "values": values,
                "curves": curves,
                "local_boxes": local_boxes,
                "after": int(metric.num_boxes[0]),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_process_compute_equals_single_process(tmp_path):
    # fork (as DataLoader workers do): the children reuse the parent's imports, no 2x re-import
    mp.start_processes(
        worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, start_method="fork"
    )
    proposals, gts = make_data()
    single = ProposalRecall(max_proposals=MAX_PROPOSALS)
    single.update(proposals, gts)
    want = {key: float(v) for key, v in single.compute().items()}
    want_curves = single.curves()
    total_boxes = int(single.num_boxes[0])

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    assert 0 < results[0]["local_boxes"] < total_boxes
    assert results[0]["local_boxes"] + results[1]["local_boxes"] == total_boxes
    for res in results:
        assert res["values"].keys() == want.keys()
        for key in want:
            assert res["values"][key] == pytest.approx(want[key], abs=1e-6), key
        for name, (xs, ys) in want_curves.items():
            assert res["curves"][name][0] == pytest.approx(xs)
            assert res["curves"][name][1] == pytest.approx(ys, abs=1e-6)
        assert res["after"] == res["local_boxes"]  # local states restored after the synced compute
    assert 0.05 < want["AR@60"] < 0.95  # the data exercise partial recall
