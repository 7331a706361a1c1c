"""The package's public surface: every contract name resolves, lazily."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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


def test_readme_library_example_runs() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert set(namespace["losses"]) == {"loss_rpn_cls", "loss_rpn_reg"}
    assert len(namespace["proposals"]) == 2
