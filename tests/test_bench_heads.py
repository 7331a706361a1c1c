"""bench/bench_heads.py: its options are checked before any run, and a tiny run prints every table."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.scripts import REPO, load_script

SCRIPT = REPO / "bench" / "bench_heads.py"


@pytest.fixture(scope="module")
def bench_heads():
    return load_script("bench/bench_heads.py", "bench_heads")


def test_settings_are_yaml_values_and_mistakes_stop_before_any_run(bench_heads) -> None:
    settings = bench_heads.parse_settings(["fg_iou=0.7", "cascade_delta_scales=[[0.1, 0.1, 0.5, 0.5], [1, 1, 1, 1]]",
                                           "fg_iou=0.5", "quality=iou"])
    assert settings == {"fg_iou": 0.5, "cascade_delta_scales": [[0.1, 0.1, 0.5, 0.5], [1, 1, 1, 1]], "quality": "iou"}
    with pytest.raises(SystemExit, match="--set expects KEY=VALUE"):
        bench_heads.parse_settings(["fg_iou"])
    bench_heads.check_settings(["plain", "oln"], {"fg_iou": 0.6})
    with pytest.raises(SystemExit, match=r"plain \(shapes.yaml\) with --set \{'fgiou': 0.5\}: .*'fgiou'"):
        bench_heads.check_settings(["plain"], {"fgiou": 0.5})
    with pytest.raises(SystemExit, match=r"oln .*proposal_score='quality' needs quality branches"):
        bench_heads.check_settings(["oln"], {"quality": None})


def test_unseen_kinds_leave_the_others_seen(bench_heads) -> None:
    assert bench_heads.seen_kinds(("triangle",)) == ("rectangle", "ellipse")
    assert bench_heads.seen_kinds(("rectangle", "ellipse")) == ("triangle",)
    for unseen in (("square",), ("rectangle", "ellipse", "triangle")):
        with pytest.raises(SystemExit, match="--unseen takes some but not all of"):
            bench_heads.seen_kinds(unseen)


def test_outlined_shapes_are_held_out_as_a_style_of_every_kind(bench_heads) -> None:
    train, held_out = bench_heads.cross_data(("outlined",), unannotated=True)
    assert train == {"synthetic_unannotated_outlined": True}
    assert held_out == {"shape_kinds": ("rectangle", "ellipse", "triangle"), "outlined_fraction": 1.0}
    assert bench_heads.cross_data(("outlined",), unannotated=False)[0] == {"synthetic_outlined_fraction": 0.0}
    assert bench_heads.cross_data(("triangle",), unannotated=True) == (
        {"synthetic_shape_kinds": ["rectangle", "ellipse"], "synthetic_unannotated_kinds": ["triangle"]},
        {"shape_kinds": ("triangle",)})
    assert bench_heads.cross_data(("triangle",), unannotated=False)[0] == {"synthetic_shape_kinds": ["rectangle", "ellipse"]}
    assert "evaluated on outlined shapes" in bench_heads.cross_label(("outlined",))
    with pytest.raises(SystemExit, match="--unseen outlined holds out a style of every kind, give it alone"):
        bench_heads.cross_data(("outlined", "triangle"), unannotated=True)


def test_textured_shapes_are_held_out_as_a_texture_of_every_kind(bench_heads) -> None:
    train, held_out = bench_heads.cross_data(("textured",), unannotated=True)
    assert train == {"synthetic_textured_fraction": 0.3, "synthetic_unannotated_textured": True}
    assert held_out == {"shape_kinds": ("rectangle", "ellipse", "triangle"), "outlined_fraction": 0.0,
                        "textured_fraction": 1.0}
    assert bench_heads.cross_data(("textured",), unannotated=False)[0] == {}
    assert "evaluated on checkerboard-textured filled shapes" in bench_heads.cross_label(("textured",))
    with pytest.raises(SystemExit, match="--unseen textured holds out a style of every kind, give it alone"):
        bench_heads.cross_data(("textured", "outlined"), unannotated=True)


def test_options_that_leave_nothing_to_run_are_refused() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-cross", "--cross-only"], capture_output=True, text=True)
    assert done.returncode == 1 and "--no-cross and --cross-only leave nothing to run" in done.stderr


def test_nms_thresholds_outside_0_1_are_refused() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--eval-nms", "0.7", "70"], capture_output=True, text=True)
    assert done.returncode == 1 and "--eval-nms takes IoU thresholds in (0, 1], got [0.7, 70.0]" in done.stderr


def test_a_tiny_run_ranks_one_model_by_each_score_and_nms() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "2", "--val-images", "4", "--variants", "oln", "--unseen", "ellipse",
         "--seed", "3", "--set", "proposal_score=geometric_mean", "--eval-scores", "objectness", "geometric_mean",
         "--eval-nms", "0.5", "0.7"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "2 steps per run, 1 thread(s), 4 held-out images, seed 3" in out
    assert "trained with boxes on rectangle+triangle, evaluated on ellipse" in out
    # the seen-kind run and the cross-category run, each ranked both ways
    assert out.count("ranked by objectness:") == 2 and out.count("ranked by geometric_mean:") == 2
    assert out.count("at NMS 0.5:") == 2 and out.count("at NMS 0.7:") == 2
    # the trained ranking and threshold are the run's own result, not evaluated again
    seen = next(line for line in out.splitlines() if line.startswith("oln "))
    assert f"AR@100 {seen.split()[1]}" in next(line for line in out.splitlines() if "ranked by geometric_mean:" in line)


def test_a_tiny_cascade_run_is_evaluated_at_each_number_of_test_iterations() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "2", "--val-images", "4", "--variants", "cascade", "--no-cross",
         "--seed", "3", "--eval-test-iterations", "0", "1", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    own = next(line for line in lines if line.startswith("cascade ")).split()[1]
    evaluated = [line for line in lines if "test iteration(s):" in line]
    assert [line.split(" test")[0].strip() for line in evaluated] == ["with 0", "with 1", "with 2"]
    # the config's own number is the run's result; the others are evaluations of the same model
    assert sum(f"AR@100 {own}" in line for line in evaluated) >= 1


def test_negative_test_iterations_are_refused() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--eval-test-iterations", "-1"], capture_output=True, text=True)
    assert done.returncode == 1 and "--eval-test-iterations must be >= 0, got [-1]" in done.stderr
