"""The package's public surface: every contract name resolves, lazily."""

from __future__ import annotations

import subprocess
import sys

import lightning_rpn

CONTRACT = [
    "AnchorGenerator", "BoxCoder", "match_anchors", "sample_anchors", "rpn_loss",
    "generate_proposals", "RPNHead", "RPN", "RPNModule", "RPNDataModule", "ProposalRecall",
]


def test_every_contract_name_is_exported() -> None:
    for name in CONTRACT:
        assert name in lightning_rpn.__all__
        assert getattr(lightning_rpn, name) is not None


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        lightning_rpn.NotAThing  # noqa: B018
    except AttributeError as error:
        assert "NotAThing" in str(error)
    else:
        raise AssertionError("expected AttributeError")


def test_core_pieces_do_not_import_lightning() -> None:
    code = (
        "import sys\n"
        "from lightning_rpn import AnchorGenerator, BoxCoder, match_anchors, sample_anchors,"
        " rpn_loss, generate_proposals, RPNHead, RPN, TorchvisionRPN\n"
        "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules, "
        "sorted(m for m in sys.modules if 'lightning' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
