"""Accounting of boxes removed by transforms and of load-time problems, per stage.

The counts travel inside each :class:`~lightning_rpn.data.batch.RPNBatch` (workers are separate
processes), and :class:`~lightning_rpn.training.datamodule.RPNDataModule` adds them up here as
batches reach the main process, then reports them at the end of each run: removed boxes are
never silent. An image standing in for an unusable one (``RPNBatch.stand_ins``) counts where it
is used: in training, which loads it again to keep the batch full; not in evaluation, which
leaves it out (the split's images counted once, as its recall counts them). A load problem is
met again each time its image is loaded (every epoch: the boxes of an image whose size the
annotation omits or gets wrong, an unreadable image), so each distinct problem is kept once,
with the number of loads that met it: memory grows with the distinct problems, not with the
epochs, and the report counts each box or image once.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.data.problems import Problem, ProblemLog

__all__ = ["BoxAccounting"]

_EVALUATION_STAGES = frozenset({"validate", "test", "predict"})
"""Stages (Lightning's stage names) whose counts leave the stand-ins out."""


class BoxAccounting:
    """Counts, per stage (``"train"``, ``"validate"``, ...), of images, boxes and removed boxes."""

    def __init__(self) -> None:
        self.images: dict[str, int] = defaultdict(int)
        self.boxes: dict[str, int] = defaultdict(int)
        self.removed_boxes: dict[str, int] = defaultdict(int)
        self.stand_ins: dict[str, int] = defaultdict(int)
        """Per stage, the images loaded in place of unusable ones (counted in ``images`` in training only)."""
        self.problems: dict[str, Counter[Problem]] = defaultdict(Counter)
        """Per stage, each distinct load problem (in the order first met) and how many loads met it."""

    def add_batch(self, stage: str, batch: RPNBatch) -> None:
        """Add one collated batch's counts to ``stage``."""
        used = batch.evaluated if stage in _EVALUATION_STAGES else range(len(batch))
        self.images[stage] += len(used)
        self.boxes[stage] += sum(int(batch.gt_boxes[i].shape[0]) for i in used)
        self.stand_ins[stage] += sum(batch.stand_ins)
        self.removed_boxes[stage] += batch.removed_boxes
        self.problems[stage].update(batch.problems)

    def stages(self) -> list[str]:
        return sorted(self.images)

    def metrics(self) -> dict[str, float]:
        """``{"<stage>/removed_boxes": n, "<stage>/removed_box_fraction": f, "<stage>/load_problems": n,
        "<stage>/distinct_load_problems": n}``: ``load_problems`` counts every load that met a problem
        (a box clipped in each of 3 epochs counts 3), ``distinct_load_problems`` each problem once."""
        out: dict[str, float] = {}
        for stage in self.stages():
            total = self.boxes[stage] + self.removed_boxes[stage]
            out[f"{stage}/removed_boxes"] = float(self.removed_boxes[stage])
            out[f"{stage}/removed_box_fraction"] = self.removed_boxes[stage] / total if total else 0.0
            out[f"{stage}/load_problems"] = float(self.problems[stage].total())
            out[f"{stage}/distinct_load_problems"] = float(len(self.problems[stage]))
        return out

    def summary(self) -> str:
        """One line per stage, plus the distinct load-time problems in full (first ten per stage)."""
        lines = []
        for stage in self.stages():
            kept, removed = self.boxes[stage], self.removed_boxes[stage]
            total = kept + removed
            fraction = f"{100.0 * removed / total:.1f}%" if total else "0%"
            lines.append(
                f"{stage}: {self.images[stage]} images{_stand_in_note(stage, self.stand_ins[stage])}, "
                f"{kept} boxes kept, {removed} removed by "
                f"transforms ({fraction}), {_problem_count(self.problems[stage])}"
            )
            if self.problems[stage]:
                lines.append("  " + ProblemLog(self.problems[stage]).summary().replace("\n", "\n  "))
        return "\n".join(lines) if lines else "no batches"

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def _stand_in_note(stage: str, stand_ins: int) -> str:
    """What the image count of ``stage`` did with its ``stand_ins``, or nothing when none."""
    if not stand_ins:
        return ""
    if stage in _EVALUATION_STAGES:
        return f" ({stand_ins} stand-ins for unusable images not counted, as in the recall)"
    return f" ({stand_ins} of them stand-ins for unusable images, trained on)"


def _problem_count(problems: Counter[Problem]) -> str:
    """How many boxes / images had a load problem, each once, and how many loads met them when more."""
    met = problems.total()
    again = (f" (met {met} times in all: each load of an image meets its problems again)"
             if met > len(problems) else "")
    return f"{len(problems)} boxes/images clipped or skipped while loading{again}"
