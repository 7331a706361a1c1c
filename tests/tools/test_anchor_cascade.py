"""Anchor coverage of a cascade: ``analyze-anchors`` and ``check-data`` say it is the plain RPN's
IoU-matching ceiling, not the cascade's, and ``--optimize`` searches the sizes only (one square
anchor per location, as the cascade takes)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.cascade import CascadeRPN
from lightning_rpn.data.dataset_report import DatasetReport, SplitReport
from lightning_rpn.tools.anchor_analysis import (
    CASCADE_COVERAGE_NOTE,
    CASCADE_SEARCH_NOTE,
    GTBoxSet,
    analyze_anchors,
    head_coverage_note,
    model_head,
    optimize_anchors,
    run_analyze_anchors,
)

SQUARE = AnchorGenerator(((16,), (32,), (64,)), ((1.0,),), (4, 8, 16))


def thin_boxes() -> GTBoxSet:
    """Boxes of ratio 1/3 to 3 (no square anchor reaches IoU 0.7 on most): the search would stretch the anchors."""
    generator = torch.Generator().manual_seed(0)
    side = torch.exp(torch.rand(60, generator=generator) * 2.0) * 12
    ratio = torch.where(torch.rand(60, generator=generator) < 0.5, 3.0, 1 / 3)
    w, h = side / ratio.sqrt(), side * ratio.sqrt()
    xy = torch.rand(60, 2, generator=generator) * 100
    boxes = torch.stack([xy[:, 0], xy[:, 1], xy[:, 0] + w, xy[:, 1] + h], dim=1).clamp(0, 256)
    return GTBoxSet.from_images([((256, 256), boxes.numpy())], 32)


def test_optimize_can_keep_the_ratios_and_search_the_sizes_only() -> None:
    boxes = thin_boxes()
    free = optimize_anchors(boxes, SQUARE)
    assert any(r != 1.0 for level in free.aspect_ratios for r in level)  # what a cascade config got before
    sizes_only = optimize_anchors(boxes, SQUARE, search_ratios=False)
    assert [list(level) for level in sizes_only.aspect_ratios] == [[1.0]] * 3
    assert sizes_only.sizes != SQUARE.sizes


def test_a_cascade_analysis_notes_the_coverage_and_keeps_square_anchors(tmp_path: Path) -> None:
    analysis = analyze_anchors(thin_boxes(), SQUARE, optimize=True, output_dir=tmp_path, head="cascade")
    assert [list(level) for level in analysis.optimized.aspect_ratios] == [[1.0]] * 3
    printed = str(analysis)
    assert "note on the coverage: model.head is 'cascade'" in printed and "plain RPN's" in printed
    assert printed.index("mean best IoU") < printed.index("note on the coverage") < printed.index("config snippet")
    snippet = (tmp_path / "anchors.yaml").read_text()
    assert f"# {CASCADE_SEARCH_NOTE}\n" in snippet and f"# {CASCADE_SEARCH_NOTE}\n" in printed
    assert yaml.safe_load(snippet)["model"]["aspect_ratios"] == [[1.0]] * 3
    report = json.loads((tmp_path / "anchor_analysis.json").read_text())
    assert report["coverage_note"] == CASCADE_COVERAGE_NOTE and report["optimize_note"] == CASCADE_SEARCH_NOTE
    assert report["coverage"]["coverage@0.70"] == pytest.approx(analysis.coverage["coverage@0.70"])  # figures kept


def test_a_plain_rpn_analysis_has_no_cascade_note(tmp_path: Path) -> None:
    analysis = analyze_anchors(thin_boxes(), SQUARE, optimize=True, output_dir=tmp_path)
    assert analysis.coverage_note is None and analysis.optimize_note is None
    assert "note on the coverage" not in str(analysis) and "sizes only" not in (tmp_path / "anchors.yaml").read_text()
    assert not {"coverage_note", "optimize_note"} & set(json.loads((tmp_path / "anchor_analysis.json").read_text()))


def test_a_cascade_analysis_refuses_anchors_the_cascade_refuses() -> None:
    stretched = AnchorGenerator(((16,), (32,)), ((2.0,),), (4, 8))
    with pytest.raises(ValueError, match=r"model.aspect_ratios \[\[2.0\], \[2.0\]\]"):
        analyze_anchors(thin_boxes(), stretched, head="cascade")
    with pytest.raises(ValueError, match="head must be 'rpn' or 'cascade', got 'oln'"):
        analyze_anchors(thin_boxes(), SQUARE, head="oln")  # type: ignore[arg-type]


def test_the_head_is_read_from_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cascade = SimpleNamespace(anchor_generator=SQUARE, size_divisibility=32,
                              rpn=CascadeRPN(SQUARE, in_channels=4))
    plain = SimpleNamespace(anchor_generator=SQUARE, size_divisibility=32, rpn=torch.nn.Identity())
    assert (model_head(cascade), model_head(plain), model_head(cascade.rpn)) == ("cascade", "rpn", "cascade")
    assert (head_coverage_note(cascade), head_coverage_note(plain)) == (CASCADE_COVERAGE_NOTE, None)
    data = [SimpleNamespace(image_size=(256, 256), boxes=np.asarray(b)) for b in [[[10.0, 10, 40, 60]]]]

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, index: int):
            return data[index]

    analysis = run_analyze_anchors(cascade, Items(), optimize=True, output_dir=tmp_path, console=None)
    assert analysis.coverage_note == CASCADE_COVERAGE_NOTE and analysis.optimize_note == CASCADE_SEARCH_NOTE
    assert "note on the coverage" in capsys.readouterr().out


def test_check_data_prints_the_note_under_each_split_s_coverage() -> None:
    split = SplitReport("train (train)", best_anchor_iou=[0.4, 0.6])
    plain = str(DatasetReport([split]))
    assert "anchor coverage (2 boxes)" in plain and "note on the coverage" not in plain
    noted = str(DatasetReport([split], coverage_note=CASCADE_COVERAGE_NOTE))
    assert noted.index("anchor coverage (2 boxes)") < noted.index(f"note on the coverage: {CASCADE_COVERAGE_NOTE}")
    assert noted.index("note on the coverage") < noted.index("problems found")
    assert "note on the coverage" not in str(DatasetReport([SplitReport("val")], coverage_note=CASCADE_COVERAGE_NOTE))
