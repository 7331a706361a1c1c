"""Per-epoch accounting of boxes removed by transforms and of load-time problems.

The counts travel inside each :class:`~lightning_rpn.data.batch.RPNBatch` (workers are separate
processes), and :class:`~lightning_rpn.training.datamodule.RPNDataModule` adds them up here as
batches reach the main process, then reports every epoch: removed boxes are never silent.
"""

from __future__ import annotations

from collections import defaultdict

from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.data.problems import ProblemLog

__all__ = ["BoxAccounting"]


class BoxAccounting:
    """Counts, per stage (``"train"``, ``"validate"``, ...), of images, boxes and removed boxes."""

    def __init__(self) -> None:
        self.images: dict[str, int] = defaultdict(int)
        self.boxes: dict[str, int] = defaultdict(int)
        self.removed_boxes: dict[str, int] = defaultdict(int)
        self.problems: dict[str, ProblemLog] = defaultdict(ProblemLog)

    def add_batch(self, stage: str, batch: RPNBatch) -> None:
        """Add one collated batch's counts to ``stage``."""
        self.images[stage] += len(batch)
        self.boxes[stage] += sum(int(b.shape[0]) for b in batch.gt_boxes)
        self.removed_boxes[stage] += batch.removed_boxes
        self.problems[stage].extend(batch.problems)

    def stages(self) -> list[str]:
        return sorted(self.images)

    def metrics(self) -> dict[str, float]:
        """``{"<stage>/removed_boxes": n, "<stage>/removed_box_fraction": f, "<stage>/load_problems": n}``."""
        out: dict[str, float] = {}
        for stage in self.stages():
            total = self.boxes[stage] + self.removed_boxes[stage]
            out[f"{stage}/removed_boxes"] = float(self.removed_boxes[stage])
            out[f"{stage}/removed_box_fraction"] = self.removed_boxes[stage] / total if total else 0.0
            out[f"{stage}/load_problems"] = float(len(self.problems[stage]))
        return out

    def summary(self) -> str:
        """One line per stage, plus the load-time problems in full (first ten per stage)."""
        lines = []
        for stage in self.stages():
            kept, removed = self.boxes[stage], self.removed_boxes[stage]
            total = kept + removed
            fraction = f"{100.0 * removed / total:.1f}%" if total else "0%"
            lines.append(
                f"{stage}: {self.images[stage]} images, {kept} boxes kept, {removed} removed by "
                f"transforms ({fraction}), {len(self.problems[stage])} boxes/images clipped or skipped while loading"
            )
            if len(self.problems[stage]):
                lines.append("  " + self.problems[stage].summary().replace("\n", "\n  "))
        return "\n".join(lines) if lines else "no batches"

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]
