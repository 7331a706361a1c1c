"""``run_files.output_repeat`` in a predict without gt boxes: its metrics summary and recall-curve
PNG are not written, so files of theirs at a number do not take it (a stand-in trainer whose
module's ``val_recall`` counted the boxes; the CLI run is in ``tests/test_cli_output_repeat_numbers.py``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_rpn.training.proposal_writer import ProposalWriter
from lightning_rpn.training.run_files import metrics_summary_path, output_repeat, repeated_name


class _Curves:
    """A callback drawing ``folder/{name}.png`` (``name.2.png``, ...) for the running evaluation."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def outputs_at(self, trainer: SimpleNamespace, repeat: int) -> list[Path]:
        return [self.folder / f"{repeated_name('predict-best', repeat)}.png"]


@pytest.mark.parametrize("gt_boxes, expected", [(0, 0), (3, 1)])
def test_a_predict_without_gt_boxes_counts_its_writers_files_alone(
    tmp_path: Path, gt_boxes: int, expected: int
) -> None:
    writer, curves = ProposalWriter(str(tmp_path / "proposals")), _Curves(tmp_path / "curves")
    recall = SimpleNamespace(num_boxes=torch.tensor([gt_boxes, 0, gt_boxes, 0]))  # all, small, medium, large
    trainer = SimpleNamespace(state=SimpleNamespace(fn="predict"), ckpt_path="ckpts/best.ckpt", global_step=0,
                              default_root_dir=str(tmp_path), callbacks=[writer, curves],
                              lightning_module=SimpleNamespace(val_recall=recall))
    earlier = [metrics_summary_path(trainer, "predict", 0), *curves.outputs_at(trainer, 0)]  # proposals elsewhere
    for path in earlier:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("an earlier predict's")
    repeat, kept = output_repeat(trainer, lambda r: writer.outputs_at(trainer, r))
    assert (repeat, kept) == (expected, earlier if expected else [])
