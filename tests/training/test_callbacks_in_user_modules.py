"""The callbacks in a user's own LightningModule (DESIGN.md usage 2): torchvision-style or dict
batches, no ``last_recall_epoch`` / ``last_recall_step``, no recall computed in ``predict``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image
from torch.utils.data import DataLoader

from lightning_rpn.evaluation.metrics import ProposalRecall
from lightning_rpn.training.callbacks import ProposalImages, RecallTable

GREY = 0.5  # float image value: drawn as 128 (0..1 floats, torchvision's convention)


def torchvision_item(i: int) -> tuple[torch.Tensor, dict[str, Any]]:
    image = torch.full((3, 40 + 4 * i, 50), GREY)
    boxes = torch.tensor([[2.0, 3.0, 20.0, 25.0]]) if i % 2 else torch.zeros(0, 4)
    labels = torch.ones(len(boxes), dtype=torch.int64)
    return image, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(7 + i)}


def torchvision_collate(items: list) -> tuple:
    return tuple(zip(*items))


def dict_collate(items: list) -> dict[str, list]:
    images, targets = zip(*items)
    ids = [f"d{int(t['image_id'])}" for t in targets]
    return {"images": list(images), "gt_boxes": [t["boxes"] for t in targets], "image_ids": ids}


class UserModule(LightningModule):
    """A user's module: its own batches, ``last_recall`` from its evaluation epochs only."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.recall = ProposalRecall(max_proposals=(5,), curve_proposals=(1,))
        self.last_recall: dict[str, float] = {}
        self.last_recall_curves: dict = {}

    @staticmethod
    def split(batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if isinstance(batch, dict):
            return batch["images"], batch["gt_boxes"]
        images, targets = batch
        return list(images), [t["boxes"] for t in targets]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.weight**2).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> dict:
        _, gt_boxes = self.split(batch)
        proposals = [(torch.tensor([[4.0, 4.0, 30.0, 30.0]]), torch.tensor([0.9])) for _ in gt_boxes]
        self.recall.update([boxes for boxes, _ in proposals], gt_boxes)
        return {"proposals": proposals}

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self.last_recall = {k: float(v) for k, v in self.recall.compute().items()}
        self.recall.reset()

    on_test_epoch_end = on_validation_epoch_end

    def predict_step(self, batch: Any, batch_idx: int) -> int:
        return batch_idx

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(collate=torchvision_collate) -> DataLoader:
    return DataLoader([torchvision_item(i) for i in range(4)], batch_size=2, collate_fn=collate)


def make_trainer(tmp_path: Path, callbacks: list) -> Trainer:
    return Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, num_sanity_val_steps=1, logger=False,
        callbacks=callbacks, default_root_dir=tmp_path, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )


@pytest.mark.parametrize("collate", [torchvision_collate, dict_collate])
def test_proposal_images_draws_torchvision_and_dict_batches(tmp_path, collate):
    make_trainer(tmp_path, [ProposalImages(num_images=3)]).validate(UserModule(), loader(collate))
    paths = sorted((tmp_path / "proposal_images").glob("*.png"))
    ids = ["7", "8", "9"] if collate is torchvision_collate else ["d7", "d8", "d9"]
    assert [p.name.rsplit("_", 1)[1] for p in paths] == [f"{i}.png" for i in ids]
    pixels = np.asarray(Image.open(paths[1]))
    assert pixels.shape == (44, 50, 3)  # the second image's own size
    assert (pixels[-1, -1] == round(GREY * 255)).all()  # 0..1 floats, away from the boxes


def test_proposal_images_skips_a_batch_it_cannot_read_with_one_warning(tmp_path):
    odd = DataLoader([torch.zeros(3, 8, 8)] * 4, batch_size=2)  # a bare image tensor: no gt boxes

    class OddBatches(UserModule):
        def validation_step(self, batch: Any, batch_idx: int) -> dict:
            return {"proposals": [(torch.zeros(0, 4), torch.zeros(0)) for _ in batch]}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [ProposalImages()]).validate(OddBatches(), odd)
    messages = [str(w.message) for w in caught if "ProposalImages" in str(w.message)]
    assert len(messages) == 1 and "'gt_boxes'" in messages[0] and "(images, targets)" in messages[0]
    assert not (tmp_path / "proposal_images").exists()


@pytest.mark.parametrize("form", ["triples", "dicts", "boxes_only"])
def test_proposal_images_reads_other_proposal_forms_or_warns_once(tmp_path, form):
    """Triples (``RPN(..., proposal_logits=True)``) and torchvision's dicts are drawn; bare boxes
    get one warning. Each stopped fit after its first epoch with an unpacking error."""
    box, score = torch.tensor([[4.0, 4.0, 30.0, 30.0]]), torch.tensor([0.9])
    item = {"triples": (box, score, score), "dicts": {"boxes": box, "scores": score}, "boxes_only": box}[form]

    class OtherForms(UserModule):
        def validation_step(self, batch: Any, batch_idx: int) -> dict:
            return {"proposals": [item for _ in self.split(batch)[1]]}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [ProposalImages(num_images=3)]).fit(OtherForms(), loader(), loader())
    messages = [str(w.message) for w in caught if "ProposalImages" in str(w.message)]
    drawn = sorted((tmp_path / "proposal_images").glob("*.png"))
    if form == "boxes_only":
        assert len(messages) == 1 and "got Tensor of shape (1, 4); no images are drawn" in messages[0] and not drawn
    else:
        assert not messages and len(drawn) == 3


def test_recall_table_at_end_of_fit_names_the_validated_epoch(tmp_path, capsys):
    make_trainer(tmp_path, [RecallTable()]).fit(UserModule(), loader(), loader())
    # the validation ran in epoch 0; Lightning's counter says 1 by the end of fit
    assert "Proposal recall (end of fit, epoch 0, step 2)" in capsys.readouterr().out


def test_recall_table_prints_no_earlier_recall_as_a_predict_or_fit_one(tmp_path, capsys):
    module = UserModule()
    make_trainer(tmp_path, [RecallTable()]).test(module, loader())
    assert "Proposal recall (test" in capsys.readouterr().out
    make_trainer(tmp_path, [RecallTable()]).predict(module, loader())  # computes no recall in predict
    assert "Proposal recall" not in capsys.readouterr().out
    make_trainer(tmp_path, [RecallTable()]).fit(module, loader())  # no validation
    assert "Proposal recall" not in capsys.readouterr().out
