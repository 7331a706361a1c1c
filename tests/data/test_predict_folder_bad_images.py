"""Unreadable images in a ``data.predict_images`` folder: ``on_bad_annotation`` applies to them as to
an annotated split's images (``skip`` / ``clip`` leave them out of the prediction, reported), and
``check-data`` checks the folder.

Before, predict stopped at the first unreadable file whatever the policy (the proposals of every
other image lost), and ``check-data``, which the error's hint named, never read the folder.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future
from pathlib import Path

import pytest
import yaml

from lightning_rpn.data.folder import ImageFolder
from lightning_rpn.data.problems import DataError
from lightning_rpn.data.validation import validate_dataset
from lightning_rpn.evaluation.proposal_files import read_detectron2_proposals
from lightning_rpn.training.datamodule import RPNDataModule

from helpers.builders import save_image
from helpers.cli import TINY_CONFIG, FitRun, assert_ok, start_cli

GOOD = ["0.png", "1.png"]
BAD = ["empty.png", "trunc.jpg"]


def _folder(root: Path, bad: tuple[str, ...] = tuple(BAD)) -> Path:
    """Two readable PNGs beside an empty PNG and a truncated JPEG (those of ``bad``)."""
    folder = root / "images"
    for i, name in enumerate(GOOD):
        save_image(folder / name, 70, 90, seed=i)
    if "empty.png" in bad:
        (folder / "empty.png").write_bytes(b"")
    if "trunc.jpg" in bad:
        whole = save_image(root / "whole.jpg", 70, 90, seed=2).read_bytes()
        (folder / "trunc.jpg").write_bytes(whole[:300])
    return folder


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---- the dataset ---------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["skip", "clip"])
def test_skip_and_clip_leave_unreadable_images_out_and_the_first_item_reports_them(tmp_path: Path, policy) -> None:
    folder = ImageFolder(_folder(tmp_path), on_bad_annotation=policy)
    assert [path.name for path in folder.files] == GOOD
    assert [(p.kind, p.action, p.image_id) for p in folder.skipped] == [
        ("unreadable_image", "skipped", "empty.png"), ("unreadable_image", "skipped", "trunc.jpg")]
    # carried once, by the first item: the run's data report counts each skipped image once
    assert folder[0].problems == folder.skipped and folder[1].problems == []


def test_raise_names_the_file_and_the_policy_that_skips_it(tmp_path: Path) -> None:
    folder = ImageFolder(_folder(tmp_path, bad=("empty.png",)))
    assert [path.name for path in folder.files] == ["0.png", "1.png", "empty.png"]  # nothing decoded up front
    with pytest.raises(DataError, match=r"empty\.png.*on_bad_annotation='skip'"):
        folder[2]
    with pytest.raises(DataError, match=r"empty\.png.*on_bad_annotation='skip'"):
        ImageFolder(folder.root, verify_images=True)  # before the first batch


def test_a_folder_of_unreadable_images_alone_is_an_error_under_skip(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    for name in GOOD:
        (folder / name).unlink()
    with pytest.raises(DataError, match="none of the 2 images can be read"):
        ImageFolder(folder, on_bad_annotation="skip")


def test_check_data_checks_the_predict_split_only_when_it_is_not_the_val_split(tmp_path: Path) -> None:
    def checked(**data) -> list[str]:
        module = RPNDataModule(dataset="synthetic", synthetic_train_images=2, synthetic_val_images=2, **data)
        return [split.name for split in validate_dataset(module, splits=("train", "val", "test", "predict")).splits]

    assert checked() == ["train (train)", "val (val)"]  # predict defaults to the val split: not twice
    assert checked(predict_split="other") == ["train (train)", "val (val)", "predict (other)"]
    folder = _folder(tmp_path)
    assert checked(predict_images=str(folder)) == ["train (train)", "val (val)", f"predict ({folder})"]


# ---- the real CLI --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tiny_fit: Future[FitRun], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Future, Path]]:
    """``check-data`` on a config naming the folder, and ``predict`` of the suite's shared checkpoint
    on the folder under ``skip`` and under ``raise`` (side by side, each in a folder of its own)."""
    root = tmp_path_factory.mktemp("predict_bad_images")
    images = _folder(root)
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"]["logger"] = False
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    started = {"check_data": (start_cli(["check-data", "--config", "config.yaml", "--data.predict_images",
                                         str(images)], root), root)}
    checkpoint = str(tiny_fit.result().workdir / "run/checkpoints/last.ckpt")
    for policy in ("skip", "raise"):
        workdir = root / policy
        workdir.mkdir()
        started[policy] = (start_cli(["predict", "--ckpt_path", checkpoint, "--data.predict_images", str(images),
                                      "--data.on_bad_annotation", policy, "--trainer.logger", "false",
                                      "--trainer.accelerator", "cpu"], workdir), workdir)
    return started


@pytest.mark.slow
def test_predict_under_skip_writes_the_readable_images_and_reports_the_others(runs) -> None:
    run, workdir = runs["skip"]
    result = run.result()
    assert_ok(result)
    records = read_detectron2_proposals(workdir / "proposals/proposals_detectron2-last.pkl")
    assert [r["image_id"] for r in records] == GOOD and all(len(r["boxes"]) for r in records)
    output = _one_line(result.stderr)
    for name in BAD:  # warned about as met, and counted in the data report at the end
        assert output.count(f"{name}, image '{name}': image file is corrupt, truncated or unreadable") == 2, name
    assert "predict: 2 images" in output and "2 x unreadable_image (skipped)" in output


@pytest.mark.slow
def test_predict_under_raise_names_the_file_and_what_finds_or_skips_it(runs) -> None:
    run, workdir = runs["raise"]
    result = run.result()
    assert result.returncode == 1, result.stdout + result.stderr
    output = _one_line(result.stderr)
    assert "Traceback" not in output
    assert "empty.png, image 'empty.png': image file is corrupt" in output
    assert "on_bad_annotation='skip'" in output  # the way on
    assert "check-data --config ...`, given the same --data options" in output  # the check that lists them all
    assert not list(workdir.rglob("*.pkl"))


@pytest.mark.slow
def test_check_data_lists_every_unreadable_image_of_the_predict_folder(runs) -> None:
    run, root = runs["check_data"]
    result = run.result()
    assert result.returncode == 1, result.stdout + result.stderr
    output = _one_line(result.stdout + result.stderr)
    assert f"split predict ({root / 'images'})" in output
    for name in BAD:
        assert f"error: {root / 'images' / name}, image '{name}': image file is corrupt" in output, name
    assert "check-data: 2 error(s)" in output
