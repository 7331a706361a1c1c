"""Area ranges sort gt boxes by their area in original-image pixels, in validate / test as in predict."""

from __future__ import annotations

import pytest
import torch

from lightning_rpn.core.boxes import box_area
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.evaluation.metrics import ProposalRecall
from lightning_rpn.training.predict import to_original_coordinates

from helpers.model import collate_for, tiny_model


def _boxes(count: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * 200
    wh = 4 + torch.rand(count, 2, generator=generator) * 150
    return torch.cat([xy, xy + wh], dim=1)


def _results(metric: ProposalRecall) -> dict[str, float]:
    return {k: float(v) for k, v in metric.compute().items()}


def test_areas_sort_boxes_as_the_scaled_boxes_and_leave_overall_recall_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    gts = [_boxes(12, generator), _boxes(7, generator)]
    props = [torch.cat([g + torch.randn(g.shape, generator=generator) * 6, _boxes(20, generator)]) for g in gts]
    scale = torch.tensor([0.25, 0.5, 0.25, 0.5])  # per axis, powers of two: the same IoU bits
    given, scaled, plain = (ProposalRecall(max_proposals=(10, 100)) for _ in range(3))
    given.update(props, gts, areas=[box_area(g * scale) for g in gts])
    scaled.update([p * scale for p in props], [g * scale for g in gts])
    plain.update(props, gts)
    assert _results(given) == _results(scaled)
    overall = {k: v for k, v in _results(plain).items() if not k.startswith("AR_")}
    assert overall == {k: v for k, v in _results(given).items() if not k.startswith("AR_")}
    assert given.num_boxes.tolist() != plain.num_boxes.tolist()  # the scale moved boxes between ranges


def test_areas_must_give_one_finite_area_per_gt_box() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 50.0, 50.0]])
    metric = ProposalRecall()
    with pytest.raises(ValueError, match=r"areas\[0\] must be 2 finite areas"):
        metric.update([gt], [gt], areas=[torch.tensor([100.0])])
    with pytest.raises(ValueError, match="got 2 area tensors for 1 images"):
        metric.update([gt], [gt], areas=[torch.ones(2), torch.ones(2)])


@pytest.mark.parametrize("scale_yx", [(0.5, 0.5), (0.5, 0.25), (2.0, 4.0)])
def test_eval_step_sorts_by_original_area_as_predict(scale_yx: tuple[float, float]) -> None:
    """A batch resized from another original size: validate's area-range recall equals that of
    the proposals and gt boxes mapped back to the original image (predict's)."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    dataset = SyntheticShapes(2, min_size=64, max_size=64, max_shapes=4, split="area-ranges")
    batch = collate_for(model)([dataset[0], dataset[1]])
    sy, sx = scale_yx  # powers of two: the mapped boxes keep their IoU bits
    batch.original_sizes = [(int(h * sy), int(w * sx)) for h, w in batch.image_sizes]
    with torch.no_grad():
        proposals = model.validation_step(batch, 0)["proposals"]
    predicted = ProposalRecall(max_proposals=model.val_recall.max_proposals)
    resized = ProposalRecall(max_proposals=model.val_recall.max_proposals)
    sizes = list(zip(batch.image_sizes, batch.original_sizes))
    predicted.update(
        [to_original_coordinates(boxes, *size) for (boxes, _), size in zip(proposals, sizes)],
        [to_original_coordinates(gt.float(), *size) for gt, size in zip(batch.gt_boxes, sizes)],
    )
    resized.update([boxes for boxes, _ in proposals], batch.gt_boxes)
    assert predicted.num_boxes.tolist() != resized.num_boxes.tolist()  # the resize moves boxes
    assert model.val_recall.num_boxes.tolist() == predicted.num_boxes.tolist()
    assert _results(model.val_recall) == _results(predicted)
