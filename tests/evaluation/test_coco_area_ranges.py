"""On COCO data, AR_small / AR_medium / AR_large are detectron2's: the annotation's ``area`` sorts
each gt box into closed ranges ``[lo, hi]``, read through the whole pipeline (file, dataset,
evaluation transform, collate, validation step, predict); data without areas sorts by box area.

The reference is detectron2's ``_evaluate_box_proposals`` rule written out here: per image the
non-crowd annotations whose ``area`` is in the range, then ``min(P, G)`` times the best-covered
gt box takes its best proposal, then recall at each IoU of ``arange(0.5, 0.95, 0.05)``, averaged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.builders import write_coco
from helpers.model import collate_for, tiny_model
from torchvision.ops import box_iou

from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.transforms import DetectionTransform, ResizePolicy, TransformedDataset
from lightning_rpn.evaluation.metrics import ProposalRecall

DETECTRON2_RANGES = {"all": (0, 1e5**2), "small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, 1e5**2)}
SIZE = 128  # images are SIZE x SIZE, evaluated at twice that (a power of two: the same IoU bits)


def xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def detectron2_ar(proposals: list[torch.Tensor], annotations: list[list[dict[str, Any]]], area: str,
                  limit: int, area_of: str = "area", thresholds: torch.Tensor | None = None) -> tuple[float, int]:
    """``(AR, number of gt boxes)`` of detectron2's box-proposal evaluation for one range and limit;
    ``area_of="box"`` sorts by the box's area instead of the annotation's."""
    lo, hi = DETECTRON2_RANGES[area]
    coverages, num_pos = [], 0
    for props, anns in zip(proposals, annotations, strict=True):
        gt_anns = [a for a in anns if a["iscrowd"] == 0]
        gt = torch.tensor([xyxy(a["bbox"]) for a in gt_anns], dtype=torch.float32).reshape(-1, 4)
        if area_of == "area":
            areas = torch.as_tensor([a["area"] for a in gt_anns])
        else:
            areas = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
        if len(gt) == 0 or len(props) == 0:
            continue  # detectron2 counts no box of such an image
        gt = gt[(areas >= lo) & (areas <= hi)]
        num_pos += len(gt)
        if len(gt) == 0:
            continue
        overlaps = box_iou(props[:limit], gt)  # [P, G]
        covered = torch.zeros(len(gt))
        for step in range(min(len(overlaps), len(gt))):
            best_iou, best_prop = overlaps.max(dim=0)  # per gt box
            g = int(best_iou.argmax())
            p = int(best_prop[g])
            covered[step] = overlaps[p, g]
            overlaps[p, :] = -1
            overlaps[:, g] = -1
        coverages.append(covered)
    overlaps = torch.cat(coverages) if coverages else torch.zeros(0)
    if thresholds is None:
        thresholds = torch.arange(0.5, 0.95 + 1e-5, 0.05, dtype=torch.float32)
    return float(torch.stack([(overlaps >= t).float().sum() / num_pos for t in thresholds]).mean()), num_pos


def coco_set(seed: int, with_areas: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                          list[torch.Tensor]]:
    """``(images, annotations, proposals)``: SIZE x SIZE images with boxes on a quarter-pixel grid
    (so xywh -> xyxy is exact in float32), each annotation's ``area`` a share (0.35 to 1) of its
    box's, as a segmentation's; image 0 holds areas of exactly 32² and 96² whose boxes are
    larger, and a box of exactly 32² whose area is smaller. Proposals: jittered copies of the gt
    boxes and random boxes, best first, in original-image pixels."""
    gen = torch.Generator().manual_seed(seed)
    images, annotations, proposals = [], [], []
    for image_id in range(6):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": SIZE, "width": SIZE})
        boxes: list[tuple[list[float], float, int]] = []
        if image_id == 0:
            boxes += [([10, 10, 40, 36], 1024, 0), ([20, 5, 100, 110], 9216, 0), ([60, 60, 32, 32], 700.5, 0)]
        for index in range(int(torch.randint(3, 9, (1,), generator=gen))):
            most, least = (SIZE // 8, 4 * 100) if index == 0 else (SIZE // 2, 8)  # a large box in each image
            x, y = (torch.randint(0, 4 * most, (2,), generator=gen) / 4).tolist()
            w = float(torch.randint(least, int(4 * (SIZE - x)), (1,), generator=gen)) / 4
            h = float(torch.randint(least, int(4 * (SIZE - y)), (1,), generator=gen)) / 4
            share = 0.35 + 0.65 * float(torch.rand(1, generator=gen))
            boxes.append(([x, y, w, h], round(w * h * share, 2), 0))
        boxes.append(([1, 1, 30, 20], 450.0, 1))  # a crowd box: no gt for recall
        for bbox, area, crowd in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "bbox": bbox,
                                "iscrowd": crowd, **({"area": area} if with_areas else {})})
        gt = torch.tensor([xyxy(b) for b, _, crowd in boxes if not crowd])
        wh = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
        copies = gt.repeat(3, 1) + (torch.rand(3 * len(gt), 4, generator=gen) - 0.5) * 0.4 * wh.repeat(3, 1)
        corners = torch.rand(25, 2, generator=gen) * SIZE * 0.8
        noise = torch.cat([corners, corners + 4 + torch.rand(25, 2, generator=gen) * SIZE * 0.4], dim=1)
        props = torch.cat([copies, noise])
        proposals.append(props[torch.randperm(len(props), generator=gen)].clamp(0, SIZE))
    return images, annotations, proposals


def by_image(images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [[a for a in annotations if a["image_id"] == image["id"]] for image in images]


def reference(proposals: list[torch.Tensor], anns: list[list[dict[str, Any]]], ks: tuple[int, ...],
              area_of: str = "area", thresholds: torch.Tensor | None = None) -> dict[str, float]:
    return {f"AR@{k}" if area == "all" else f"AR_{area}@{k}":
            detectron2_ar(proposals, anns, area, k, area_of, thresholds)[0] for k in ks for area in DETECTRON2_RANGES}


def ar_keys(metric: ProposalRecall) -> dict[str, float]:
    return {key: float(value) for key, value in metric.compute().items() if key.startswith("AR")}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ar_per_area_range_equals_detectron2s_on_annotation_areas(seed: int) -> None:
    images, annotations, proposals = coco_set(seed)
    anns = by_image(images, annotations)
    metric = ProposalRecall(max_proposals=(10, 100))
    gts = [torch.tensor([xyxy(a["bbox"]) for a in image if not a["iscrowd"]]) for image in anns]
    metric.update(proposals, gts, areas=[torch.tensor([a["area"] for a in image if not a["iscrowd"]])
                                         for image in anns])
    assert ar_keys(metric) == pytest.approx(reference(proposals, anns, (10, 100)), abs=1e-6)
    counts = [detectron2_ar(proposals, anns, area, 100)[1] for area in DETECTRON2_RANGES]
    assert metric.num_boxes.tolist() == counts
    assert counts[1] + counts[2] + counts[3] == counts[0] + 2  # 32² and 96² count in two ranges each


def evaluation_batch(tmp_path: Path, model: Any, with_areas: bool = True) -> tuple[Any, list[torch.Tensor],
                                                                                     list[list[dict[str, Any]]]]:
    """The batch of every image of ``coco_set(0)`` through the dataset, the evaluation transform
    (resized to twice the size) and the model's collate; the proposals; the annotations by image."""
    images, annotations, proposals = coco_set(0, with_areas)
    dataset = COCODetection(*write_coco(tmp_path, images, annotations))
    resize = ResizePolicy("shortest_edge", min_sizes=(2 * SIZE,), max_size=2 * SIZE)
    evaluated = TransformedDataset(dataset, DetectionTransform(resize=resize, pixel_only=True))
    batch = collate_for(model)([evaluated[i] for i in range(len(evaluated))])
    assert batch.image_sizes == [(2 * SIZE, 2 * SIZE)] * len(images)
    return batch, proposals, by_image(images, annotations)


def validate_with(model: Any, batch: Any, proposals: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.validation_step(batch)`` with ``proposals`` (original-image pixels) as the model's."""
    run = model._run

    def with_proposals(batch: Any, stage: str, **kwargs: Any) -> tuple[list, dict[str, torch.Tensor]]:
        _, losses = run(batch, stage, **kwargs)
        return [(p * 2, torch.linspace(1, 0, len(p))) for p in proposals], losses
    monkeypatch.setattr(model, "_run", with_proposals)
    with torch.no_grad():
        model.validation_step(batch, 0)


def test_validation_and_predict_sort_by_the_coco_files_areas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model().eval()
    batch, proposals, anns = evaluation_batch(tmp_path, model)
    want = reference(proposals, anns, model.val_recall.max_proposals)
    assert want != reference(proposals, anns, model.val_recall.max_proposals, area_of="box")  # areas matter here
    validate_with(model, batch, proposals, monkeypatch)
    assert ar_keys(model.val_recall) == pytest.approx(want, abs=1e-6)
    model.val_recall.reset()
    outputs = [{"boxes": p} for p in proposals]  # predict_step's boxes: in original-image pixels
    model.on_predict_batch_end(outputs, batch, 0)
    assert ar_keys(model.val_recall) == pytest.approx(want, abs=1e-6)


def test_a_coco_file_without_areas_sorts_by_box_area_in_original_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model().eval()
    batch, proposals, anns = evaluation_batch(tmp_path, model, with_areas=False)
    assert batch.annotation_areas == []
    validate_with(model, batch, proposals, monkeypatch)
    want = reference(proposals, anns, model.val_recall.max_proposals, area_of="box")
    assert ar_keys(model.val_recall) == pytest.approx(want, abs=1e-6)
