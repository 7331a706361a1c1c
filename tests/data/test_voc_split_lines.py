"""VOC split files: a line is an id, optionally followed by a -1 / 0 / 1 class flag."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.builders import write_voc

from lightning_rpn.data.problems import DataError
from lightning_rpn.data.voc import VOCDetection, read_split_ids


def voc_with_split_lines(root: Path, text: str) -> Path:
    write_voc(root, {"a": {"size": (40, 60), "objects": [{"box": (2, 2, 20, 20)}]}})
    (root / "ImageSets/Main/train.txt").write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize("line, columns", [("my photo é", 3), ("my photo", 2), ("a 1 extra", 3)])
def test_a_line_with_more_than_an_id_and_a_class_flag_is_an_error_naming_it(
    tmp_path: Path, line: str, columns: int
) -> None:
    root = voc_with_split_lines(tmp_path, f"a\n{line}\n")
    with pytest.raises(DataError) as info:
        VOCDetection(root, "train")
    message = str(info.value)
    assert message.startswith(str(root / "ImageSets/Main/train.txt"))
    assert f"line 2 {line!r} has {columns} columns" in message and "spaces are not supported" in message
    assert "Annotations" not in message


def test_class_flags_after_the_id_are_accepted(tmp_path: Path) -> None:
    root = voc_with_split_lines(tmp_path, "a  1\nb -1\n\nc 0\n")
    assert read_split_ids(root, "train") == ["a", "b", "c"]
