"""``run_files.output_repeat``: one repeat number for every output of an evaluation, the first free
for all of them, chosen once per evaluation and never one that would replace a file.

Stand-in trainers (a state, a checkpoint, a step, callbacks with ``outputs_at``) and files made
by hand; the end-to-end runs through the CLI are in ``tests/test_cli_output_repeats.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from lightning_rpn.training.proposal_writer import ProposalWriter
from lightning_rpn.training.run_files import metrics_summary_path, output_repeat, repeated, repeated_name


class _Outputs:
    """A callback writing ``folder/{name}.png`` (``name.2.png``, ...) for the running evaluation."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name

    def outputs_at(self, trainer: SimpleNamespace, repeat: int) -> list[Path]:
        return [self.folder / f"{repeated_name(self.name, repeat)}.png"]


def _trainer(root: Path, callbacks: list, fn: str = "validate", step: int = 0) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(fn=fn), ckpt_path="ckpts/best.ckpt", global_step=step,
                           default_root_dir=str(root), callbacks=callbacks)


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("an earlier run's")


def test_repeated_names() -> None:
    assert [repeated_name("val-best", r) for r in (0, 1, 2)] == ["val-best", "val-best.2", "val-best.3"]
    assert repeated(Path("m/predict-best-v1.json"), 1) == Path("m/predict-best-v1.2.json")


def test_the_first_number_free_for_every_output_whoever_asks_first(tmp_path: Path) -> None:
    curves = _Outputs(tmp_path / "curves", "val-best")
    trainer = _trainer(tmp_path, [curves])
    summary = lambda r: [metrics_summary_path(trainer, "validate", r)]  # noqa: E731
    # earlier commands wrote only some outputs: a summary alone (number 1), a PNG alone (number 2)
    _touch(summary(0)[0], *curves.outputs_at(trainer, 0), *summary(1), *curves.outputs_at(trainer, 2))
    repeat, kept = output_repeat(trainer, summary)  # the summary asks first: the PNG's names count too
    assert repeat == 3
    assert kept == [*summary(0), *curves.outputs_at(trainer, 0), *summary(1), *curves.outputs_at(trainer, 2)]
    _touch(*summary(3))  # written; the PNG of the same evaluation asks next and gets the same number
    assert output_repeat(trainer, lambda r: curves.outputs_at(trainer, r)) == (3, kept)


def test_another_evaluation_chooses_again_and_no_file_is_replaced(tmp_path: Path) -> None:
    curves = _Outputs(tmp_path / "curves", "val_epoch000_step2")
    trainer = _trainer(tmp_path, [curves], fn="fit", step=2)
    png = lambda r: curves.outputs_at(trainer, r)  # noqa: E731
    assert output_repeat(trainer, png) == (0, [])
    _touch(*png(0))
    trainer.global_step = 4  # the fit's next validation: another evaluation
    curves.name = "val_epoch001_step4"
    assert output_repeat(trainer, png) == (0, [])
    _touch(*png(0))
    # the same evaluation again by the same trainer (a second trainer.validate of the weights):
    # the asker's own file holds the number chosen before, so it is chosen again
    assert output_repeat(trainer, png) == (1, png(0))


def test_a_predict_counts_its_writers_files_and_summary_and_fit_does_not(tmp_path: Path) -> None:
    writer = ProposalWriter(str(tmp_path / "proposals"))
    curves = _Outputs(tmp_path / "curves", "predict-best")
    predicting = _trainer(tmp_path, [writer, curves], fn="predict")
    _touch(writer.outputs_at(predicting, 0)[1])  # an earlier predict wrote the detectron2 file alone
    _touch(metrics_summary_path(predicting, "predict", 1))  # one without a writer, a summary
    assert output_repeat(predicting, lambda r: curves.outputs_at(predicting, r))[0] == 2
    # in fit the writer writes nothing and no summary is written: their names do not count
    fitting = _trainer(tmp_path, [writer], fn="fit")
    assert writer.outputs_at(fitting, 0) == []
    assert output_repeat(fitting, lambda r: [tmp_path / f"{repeated_name('val', r)}.png"]) == (0, [])


def test_a_notice_lists_the_last_four_files_passed_over_and_counts_the_rest() -> None:
    from pathlib import Path

    from lightning_rpn.training.run_files import listed_paths

    paths = [Path(f"images/val-last_{k}.png") for k in range(8)]
    assert listed_paths(paths[:2]) == "images/val-last_0.png, images/val-last_1.png"
    assert listed_paths(paths) == ("images/val-last_4.png, images/val-last_5.png, images/val-last_6.png, "
                                   "images/val-last_7.png and 4 earlier")
