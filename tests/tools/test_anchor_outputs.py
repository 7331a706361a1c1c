"""``analyze-anchors`` output folders: files of an earlier run, or a hand-written ``anchors.yaml``,
are refused before the analysis unless ``--force`` / ``overwrite``, and a snippet the run did
not write is named as not its own."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from lightning_rpn.cli import main
from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.tools import anchor_analysis
from lightning_rpn.tools.anchor_analysis import GTBoxSet, analyze_anchors, run_analyze_anchors

GENERATOR = AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),), (4, 8))
HAND_WRITTEN = "# my hand-tuned anchors\nmodel:\n  anchor_sizes: [[20], [40]]\n"


def boxes() -> GTBoxSet:
    return GTBoxSet.from_images([((128, 128), np.array([[10.0, 10.0, 40.0, 30.0], [50.0, 50.0, 90.0, 100.0]]))], 32)


def test_earlier_files_are_kept_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "anchors.yaml").write_text(HAND_WRITTEN)
    (tmp_path / "anchor_analysis.json").write_text('{"my": "earlier report"}')
    with pytest.raises(FileExistsError, match=r"anchor_analysis\.json, anchors\.yaml already there.*--force"):
        analyze_anchors(boxes(), GENERATOR, optimize=True, output_dir=tmp_path)
    assert (tmp_path / "anchors.yaml").read_text() == HAND_WRITTEN
    assert (tmp_path / "anchor_analysis.json").read_text() == '{"my": "earlier report"}'
    assert not (tmp_path / "anchor_analysis.png").exists()
    analysis = analyze_anchors(boxes(), GENERATOR, optimize=True, output_dir=tmp_path, overwrite=True)
    assert yaml.safe_load((tmp_path / "anchors.yaml").read_text())["model"]["anchor_sizes"] != [[20], [40]]
    assert json.loads((tmp_path / "anchor_analysis.json").read_text())["notes"] == analysis.notes
    assert analysis.notes == [f"replaced the earlier anchor_analysis.json, anchors.yaml in {tmp_path}"]


def test_a_snippet_the_run_did_not_write_is_kept_and_named(tmp_path: Path) -> None:
    """Without optimize a hand-written (or earlier) anchors.yaml is not this run's file: no refusal,
    kept, and the report says it is not from this run."""
    (tmp_path / "anchors.yaml").write_text(HAND_WRITTEN)
    analysis = analyze_anchors(boxes(), GENERATOR, output_dir=tmp_path)
    assert (tmp_path / "anchors.yaml").read_text() == HAND_WRITTEN
    assert "config_snippet" not in analysis.files
    note = f"kept {tmp_path / 'anchors.yaml'}: not this run's snippet (this run did not optimise)"
    assert analysis.notes == [note]
    assert json.loads((tmp_path / "anchor_analysis.json").read_text())["notes"] == [note]
    assert f"note: {note}" in " ".join(str(analysis).split())


def test_the_folder_is_checked_before_the_boxes_are_read(tmp_path: Path) -> None:
    (tmp_path / "anchor_analysis.png").write_bytes(b"an earlier plot")
    model = SimpleNamespace(anchor_generator=GENERATOR, size_divisibility=32)
    # a data module that cannot be read: the refusal must come first
    with pytest.raises(FileExistsError, match=r"anchor_analysis\.png already there"):
        run_analyze_anchors(model, object(), output_dir=tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="a file of that name exists"):
        run_analyze_anchors(model, object(), output_dir=tmp_path / "a_file")
    (tmp_path / "other" / "anchors.yaml").mkdir(parents=True)
    with pytest.raises(ValueError, match="anchors.yaml there is a folder"):
        run_analyze_anchors(model, object(), optimize=True, output_dir=tmp_path / "other", overwrite=True)


def test_run_analyze_anchors_keeps_the_model_s_fg_iou(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return GENERATOR

    monkeypatch.setattr(anchor_analysis, "optimize_anchors", spy)
    monkeypatch.setattr(anchor_analysis, "collect_gt_boxes", lambda *args, **kwargs: boxes())
    model = SimpleNamespace(anchor_generator=GENERATOR, size_divisibility=32,
                            target_config=SimpleNamespace(fg_iou=0.3))
    run_analyze_anchors(model, None, optimize=True, output_dir=tmp_path)
    assert seen["fg_iou"] == 0.3


def test_cli_refuses_an_existing_file_unless_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "logger": False},
        "model": {"backbone": "tiny_fpn", "anchor_sizes": [[16], [32], [64], [128]]},
        "data": {"dataset": "synthetic", "synthetic_train_images": 4, "synthetic_val_images": 2,
                 "num_workers": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    out.mkdir()
    (out / "anchors.yaml").write_text(HAND_WRITTEN)
    args = ["analyze-anchors", "--config", str(tmp_path / "config.yaml"), "--optimize", "--output_dir", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lightning-rpn analyze-anchors --output_dir" in err and "anchors.yaml already there" in err
    assert (out / "anchors.yaml").read_text() == HAND_WRITTEN and not (out / "anchor_analysis.json").exists()
    assert main([*args, "--force"]) == 0
    assert "replaced the earlier anchors.yaml" in " ".join(capsys.readouterr().out.split())
    assert (out / "anchors.yaml").read_text() != HAND_WRITTEN
