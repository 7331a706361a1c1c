"""sanitize_boxes: the one-test path for clean images and the box-by-box path keep the same boxes."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_rpn.data.problems import AnnotationRef, DataError, ProblemLog, sanitize_boxes

REF = AnnotationRef("instances.json", 7)


def test_clean_boxes_are_kept_as_float32_xyxy_without_problems() -> None:
    written = np.array([[0, 0, 10, 20], [5.5, 6.25, 94.5, 73.75], [90, 70, 10, 10]], dtype=np.float64)
    log = ProblemLog()
    boxes, ids = sanitize_boxes(written, [1, "b", 3], (80, 100), "raise", REF, log, "xywh")
    assert boxes.dtype == np.float32 and ids == [1, "b", 3] and len(log) == 0
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 20], [5.5, 6.25, 100, 80], [90, 70, 100, 80]])
    empty, no_ids = sanitize_boxes(np.zeros((0, 4)), [], (80, 100), "raise", REF, log)
    assert empty.shape == (0, 4) and empty.dtype == np.float32 and no_ids == []


def test_clean_boxes_keep_their_place_among_repaired_and_skipped_ones() -> None:
    written = np.array([
        [1, 1, 5, 5],            # clean
        [-1, 2, 8, 9],           # slightly outside: clipped
        [10, 10, 20, 20],        # clean
        [30, 30, 30, 40],        # empty: skipped
        [np.nan, 1, 2, 3],       # non-finite: skipped
        [50, 1, 50 + 1e-9, 9],   # empty once stored in float32: skipped
        [40, 40, 99, 79],        # clean
    ])
    log = ProblemLog()
    boxes, ids = sanitize_boxes(written, list("abcdefg"), (80, 100), "skip", REF, log)
    assert ids == ["a", "b", "c", "g"]
    np.testing.assert_array_equal(boxes, np.array([[1, 1, 5, 5], [0, 2, 8, 9], [10, 10, 20, 20], [40, 40, 99, 79]],
                                                  dtype=np.float32))
    assert [(p.kind, p.action, p.annotation_id) for p in log] == [
        ("slightly_outside", "clipped", "b"), ("empty_box", "skipped", "d"), ("non_finite", "skipped", "e"),
        ("empty_box", "skipped", "f")]
    assert "box [-1, 2, 8, 9] (x1, y1, x2, y2) extends outside the 100x80 image" in log.problems[0].detail


def test_a_problem_raises_under_the_raise_policy_naming_the_box() -> None:
    with pytest.raises(DataError, match=r"bbox \[1, 2, 0, 4\] \(x, y, w, h\) is empty"):
        sanitize_boxes(np.array([[0, 0, 5, 5], [1, 2, 0, 4]]), [1, 2], (80, 100), "raise", REF, ProblemLog(), "xywh")
