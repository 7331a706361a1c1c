"""Head settings that cannot work are one-line refusals (SettingError); the cascade's own settings on
the plain head are named as ignored, and never make a plain checkpoint refuse to load."""

from __future__ import annotations

import pytest

from lightning_rpn import cli
from lightning_rpn.core.config import SettingError
from lightning_rpn.training.checkpoint_agreement import check_checkpoint_agrees
from lightning_rpn.training.module import RPNModule

TINY = dict(backbone="tiny_fpn", anchor_sizes=[[16], [32], [64], [128]])


@pytest.mark.parametrize(("settings", "message"), [
    ({"proposal_score": "quality"}, "model: RPN: proposal_score='quality' needs quality branches, got quality=None"),
    ({"quality": "centreness"}, "model: RPNHead: quality: expected None or '+'-joined distinct branches"),
    ({"quality": "none"}, "got 'none' (no branch is null in YAML, None in Python)"),
    ({"fg_iou": 1.5}, "model: AnchorTargetConfig: need 0 <= bg_iou <= fg_iou <= 1"),
    ({"nms_thresh": 2.0}, "nms_thresh must be in [0, 1], got 2.0"),
    ({"head": "cascade", "aspect_ratios": [[1.0]], "proposal_score": "geometric_mean"},
     "model: CascadeRPN: proposal_score='geometric_mean' needs quality branches"),
])
def test_a_head_setting_that_cannot_work_is_a_setting_error(settings: dict, message: str) -> None:
    with pytest.raises(SettingError) as refused:
        RPNModule(**TINY, **settings)
    assert message in str(refused.value)


def test_the_command_line_refuses_it_in_one_line(tiny_cli_config: str, capsys: pytest.CaptureFixture) -> None:
    # a ValueError from the head's constructor was a 55-line traceback with exit 1
    code = cli.main(["fit", "--config", tiny_cli_config, "--trainer.logger", "false", "--model.quality", "centreness"])
    assert code == cli.USAGE_ERROR
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert "lightning-rpn: model: RPNHead: quality: expected None" in error


def test_the_cascades_settings_on_the_plain_head_are_named_as_ignored() -> None:
    with pytest.warns(UserWarning, match=r"model\.cascade_stages, model\.cascade_test_iterations apply to "
                                         r"model\.head: cascade only; this run's head is 'rpn', which ignores them"):
        RPNModule(**TINY, cascade_stages=3, cascade_test_iterations=1)


def test_a_plain_checkpoint_is_not_judged_by_the_cascades_settings() -> None:
    # a plain run given cascade_stages 3 (ignored) could not be validated by its own config without it
    check_checkpoint_agrees({"head": "rpn", "cascade_stages": 3, "cascade_dilation": 2},
                            {"head": "rpn", "cascade_stages": 2, "cascade_dilation": 3})
    with pytest.raises(SettingError, match="cascade_stages: checkpoint 3, this run 2"):
        check_checkpoint_agrees({"head": "cascade", "cascade_stages": 3}, {"head": "cascade", "cascade_stages": 2})
