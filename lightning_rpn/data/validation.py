"""Dataset checks for ``lightning-rpn check-data``: counts, box statistics, problems found.

:func:`validate_dataset` takes a dataset (COCO, VOC, synthetic, or any dataset of
:class:`~lightning_rpn.data.sample.DetectionSample` s) or an
:class:`~lightning_rpn.training.datamodule.RPNDataModule` (each configured split is checked, its
annotations read with ``on_bad_annotation="skip"`` and unsafe paths reported, so that every
problem is listed rather than the first one raised; a split whose annotations cannot be read at
all is one problem of that split; the predict role is its ``predict_images`` folder when it names
one). A split whose images hold no ground-truth box (and no error that explains it) is an error
for the train role (``no_boxes``: training learns only background from it, and ``fit`` refuses
it) and a warning for any other but a folder of images (``no_eval_boxes``: recall is undefined on
it). File-backed datasets are checked from their annotations plus every image
decoded, as training will decode it (a truncated file is found); other datasets are iterated.
Given anchors, the report adds their coverage of the gt boxes
(:class:`AnchorProbe`).

The returned :class:`~lightning_rpn.data.dataset_report.DatasetReport` (with its
:class:`~lightning_rpn.data.dataset_report.SplitReport` s, in :mod:`lightning_rpn.data.dataset_report`
and served here too) prints as rich tables, converts to a dict, writes every problem to a JSON
or CSV file and separates errors from warnings.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from rich.progress import track
from torch.utils.data import Dataset

from lightning_rpn.core.coverage import GTBoxSet, best_anchor_iou
from lightning_rpn.data.annotated import (
    PROGRESS_MIN_ITEMS,
    AnnotatedDataset,
    boxes_at_size,
    size_mismatch_problem,
    unreadable_image_problem,
)
from lightning_rpn.data.dataset_report import (
    AREA_BUCKETS,
    ASPECT_BUCKETS,
    MAX_LISTED,
    PERCENTILES,
    REPORT_SUFFIXES,
    DatasetReport,
    SplitReport,
    report_path,
)
from lightning_rpn.data.folder import ImageFolder
from lightning_rpn.data.image_io import read_image_size, verify_image
from lightning_rpn.data.problems import BOX_PROBLEM_KINDS, DataError, Problem
from lightning_rpn.data.window_fit import untrainable_boxes_problem
from lightning_rpn.data.transforms import ResizePolicy, TransformedDataset

__all__ = [
    "validate_dataset", "DatasetReport", "SplitReport", "AnchorProbe", "PERCENTILES", "ASPECT_BUCKETS",
    "AREA_BUCKETS", "MAX_LISTED", "REPORT_SUFFIXES", "report_path", "no_boxes_problem", "listing_file",
]

_NO_BOX_CAUSES = ("likely causes: data.category_ids / category_names selecting categories that no annotation "
                  "uses, every box marked iscrowd (COCO) or difficult (VOC; data.keep_difficult: true keeps those), "
                  "every box dropped by on_bad_annotation, or annotations without any box")


def listing_file(dataset: Any) -> str | None:
    """The file that lists a file-backed dataset's images (COCO's annotation file, VOC's split file)."""
    return getattr(dataset, "annotation_file", None) or getattr(dataset, "split_file", None)


def no_boxes_problem(role: str | None, images: int, crowd_boxes: int, file: str | None) -> Problem:
    """The problem of a split whose ``images`` hold no ground-truth box: an error for the ``"train"``
    ``role`` (no positive anchor, nothing for box regression to learn), else a warning (recall is undefined)."""
    crowd = f" (only {crowd_boxes} crowd / difficult boxes, which are never positives)" if crowd_boxes else ""
    held = f"its {images} image(s) hold no ground-truth box{crowd}: "
    if role == "train":
        return Problem("no_boxes", "skipped", held + "no anchor would be a positive, so training would learn only "
                       f"background (loss_rpn_reg 0 at every step), and fit refuses it; {_NO_BOX_CAUSES}", file)
    meaningless = "; best.ckpt chosen on it is meaningless" if role == "val" else ""
    return Problem("no_eval_boxes", "kept", f"{held}recall is undefined (-1){meaningless}; {_NO_BOX_CAUSES}", file)


class AnchorProbe:
    """Best anchor IoU of gt boxes (:func:`~lightning_rpn.core.coverage.best_anchor_iou`, the
    computation ``analyze-anchors`` reports), on the first ``max_images`` images with boxes
    (``None``: all of them).

    Images are resized with the evaluation resize policy and padded to ``size_divisibility``;
    the anchors are those the model would use for that single-image batch.
    """

    def __init__(self, anchor_generator: Any, size_divisibility: int | None = None,
                 resize: ResizePolicy | None = None, max_images: int | None = None) -> None:
        self.anchor_generator = anchor_generator
        self.size_divisibility = size_divisibility or max(anchor_generator.strides)
        self.resize = resize or ResizePolicy()
        self.max_images = max_images
        self.images = 0

    def add(self, report: SplitReport, size: tuple[int, int] | None, boxes: np.ndarray) -> None:
        if size is None or len(boxes) == 0 or (self.max_images is not None and self.images >= self.max_images):
            return
        self.images += 1
        new_size = self.resize.target_size(size, train=False)
        scale = np.array([new_size[1] / size[1], new_size[0] / size[0]] * 2, dtype=np.float32)
        box_set = GTBoxSet.from_images([(new_size, np.asarray(boxes, np.float32) * scale)], self.size_divisibility)
        best, _ = best_anchor_iou(box_set, self.anchor_generator)
        report.best_anchor_iou.extend(best.tolist())


WindowFit = tuple[int, float]
"""``(data.tiles.size, min_visibility)`` of a split trained on windows: boxes no window keeps are reported."""


def _check_window_fit(report: SplitReport, windows: WindowFit | None, size: tuple[int, int] | None,
                      boxes: np.ndarray, file: str | None, image_id: int | str) -> None:
    """Report the boxes of an image that no training window keeps (``box_larger_than_window``)."""
    if windows is not None and size is not None and len(boxes):
        problem = untrainable_boxes_problem(boxes, size, windows[0], windows[1], file, image_id)
        if problem is not None:
            report.problems.add(problem)


def _check_annotated(
    dataset: AnnotatedDataset, report: SplitReport, check_images: bool, probe: AnchorProbe | None,
    windows: WindowFit | None = None, skip_mismatched: bool = False,
) -> None:
    """Each record's image decoded (``check_images``; else its header read where the annotation
    gives no size) and its boxes checked against the file's size; the dataset's own problems kept
    but for the box problems of images whose file size differs from the annotated one (found again).
    ``skip_mismatched`` (fit's ``on_bad_annotation='skip'``): such an image is skipped, as fit skips it."""
    records = dataset.records
    rechecked: set[tuple[str, int | str]] = set()
    for record in track(records, description=f"Checking {report.name}", disable=len(records) < PROGRESS_MIN_ITEMS,
                        transient=True):
        size = record.size
        if check_images or size is None:
            try:
                read = verify_image if check_images else read_image_size
                size = read(record.file, image_id=record.image_id)
            except DataError as error:
                report.problems.add(unreadable_image_problem(record, error))
                continue
            if record.size is not None and record.size != size:
                report.problems.add(size_mismatch_problem(record, size, "skipped" if skip_mismatched else "clipped"))
                if skip_mismatched:
                    rechecked.add((record.annotation_file, record.image_id))  # its boxes are not trained on
                    continue
        boxes, crowd = record.boxes, record.crowd_boxes
        if not record.checked or size != record.size:
            rechecked.add((record.annotation_file, record.image_id))
            boxes, crowd = boxes_at_size(record, size, "skip", report.problems, dataset.box_format)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        report.add_image(size, boxes, np.asarray(crowd, np.float32).reshape(-1, 4))
        _check_window_fit(report, windows, size, boxes, record.file, record.image_id)
        if probe is not None:
            probe.add(report, size, boxes)
    report.problems.extend(p for p in dataset.problems
                           if p.kind not in BOX_PROBLEM_KINDS or (p.file, p.image_id) not in rechecked)


def _check_items(dataset: Dataset, report: SplitReport, probe: AnchorProbe | None,
                 windows: WindowFit | None = None) -> None:
    n = len(dataset)  # type: ignore[arg-type]
    for index in track(range(n), description=f"Checking {report.name}", disable=n < PROGRESS_MIN_ITEMS,
                       transient=True):
        try:
            sample = dataset[index]
        except DataError as error:
            report.problems.add(Problem("unreadable_item", "skipped", error.reason, error.file, error.image_id,
                                        error.annotation_id))
            continue
        report.problems.extend(sample.problems)
        report.add_image(sample.image_size, sample.boxes, sample.crowd_boxes)
        _check_window_fit(report, windows, sample.image_size, sample.boxes, sample.source, sample.image_id)
        if probe is not None:
            probe.add(report, sample.image_size, sample.boxes)


def _role_dataset(target: Any, split: str | None, folder: str | None) -> Dataset | DataError:
    """The dataset ``check-data`` reads for a data module's split (annotation problems skipped and
    listed, unsafe paths reported) or image ``folder``, or the :class:`DataError` that building it
    raised (one problem of the split)."""
    try:
        if folder is not None:
            return ImageFolder(folder, on_bad_annotation="skip")
        return target.build_dataset(split, on_bad_annotation="skip", verify_images=False, report_unsafe_paths=True)
    except DataError as error:
        return error


def validate_dataset(
    target: Any,
    check_images: bool = True,
    name: str = "dataset",
    splits: Sequence[str] = ("train", "val", "test"),
    anchor_generator: Any = None,
    size_divisibility: int | None = None,
    resize: ResizePolicy | None = None,
    max_anchor_images: int | None = None,
) -> DatasetReport:
    """Check a dataset, or the ``splits`` (roles) of an ``RPNDataModule``; a :class:`DatasetReport`.

    The ``"predict"`` role is the data module's ``predict_images`` folder when it names one (each
    image decoded; unreadable ones are ``unreadable_image`` errors), else its predict split unless
    that is a split checked already (by default it is the val split).

    ``check_images`` decodes each image of file-backed datasets (missing, corrupt, truncated
    and mis-sized files are reported as problems); without it, only the images whose annotation
    gives no size are opened, for the size in their header. A split without images is an
    ``empty_split`` error; one whose images hold no gt box (and that has no error, whose boxes
    were skipped) a ``no_boxes`` error for the train role of a data module, else a
    ``no_eval_boxes`` warning. With an ``anchor_generator`` (a data
    module's own, by default), the report adds anchor coverage: the best anchor IoU of the gt
    boxes of the first ``max_anchor_images`` images (``None``: all), after the evaluation ``resize``.
    A data module's train split trained on windows (``data.tiles``) also gets a
    ``box_larger_than_window`` warning for each image with boxes that no window keeps.
    """
    windows: dict[str, WindowFit | None] = {}
    roles: dict[str, str] = {}
    # the policy fit applies: under skip an image of another size than annotated is skipped, else clipped
    policy = getattr(target, "on_bad_annotation", None) or getattr(target, "hparams", {}).get("on_bad_annotation")
    if isinstance(target, Dataset):
        datasets: list[tuple[str, Dataset | DataError]] = [(name, target)]
    elif callable(getattr(target, "build_dataset", None)) and isinstance(getattr(target, "splits", None), dict):
        datasets = []  # an RPNDataModule (duck-typed: no Lightning import here)
        tiles = getattr(target, "tiles", None)
        hparams = getattr(target, "hparams", {})
        train_windows = None if tiles is None else (tiles.size, float(hparams.get("min_visibility", 0.0)))
        checked: set[str] = set()
        for role in splits:
            if role not in target.splits:
                raise ValueError(f"validate_dataset: unknown split role {role!r}; expected one of {sorted(target.splits)}")
            split = target.splits[role]
            folder = getattr(target, "predict_images", None) if role == "predict" else None
            if folder is None and (split is None or (role == "predict" and split in checked)):
                continue  # no such split, or predict's default: the val split, checked already
            if folder is None:
                checked.add(split)
            name = f"{role} ({split if folder is None else folder})"
            datasets.append((name, _role_dataset(target, split, folder)))
            windows[name] = train_windows if role == "train" else None
            roles[name] = role
        anchor_generator = anchor_generator or getattr(target, "anchor_generator", None)
        size_divisibility = size_divisibility or getattr(target, "size_divisibility", None)
        resize = resize or getattr(target, "resize_policy", None)
    else:
        raise TypeError(f"validate_dataset: expected a Dataset or RPNDataModule, got {type(target).__name__}")
    reports = []
    for split_name, dataset in datasets:
        fit = windows.get(split_name)
        report = SplitReport(split_name)
        reports.append(report)
        if isinstance(dataset, DataError):
            report.problems.add(Problem("unreadable_split", "skipped", f"{dataset.reason}; the split was not checked",
                                        dataset.file, dataset.image_id, dataset.annotation_id))
            continue
        probe = None if anchor_generator is None else AnchorProbe(
            anchor_generator, size_divisibility, resize, max_anchor_images)
        # the data module's splits come wrapped in their transform; any other wrapper (a Subset) is
        # checked item by item, as it is
        inner = dataset.dataset if isinstance(dataset, TransformedDataset) else dataset
        if isinstance(inner, AnnotatedDataset):
            _check_annotated(inner, report, check_images, probe, fit, skip_mismatched=policy == "skip")
        else:
            _check_items(inner, report, probe, fit)
        if len(inner) == 0:  # type: ignore[arg-type]
            report.problems.add(Problem("empty_split", "skipped", "the split lists no images; training and "
                                        "evaluation refuse it", listing_file(inner)))
        elif report.images and not report.boxes and report.ok and not isinstance(inner, ImageFolder):
            # else errors, their boxes skipped, explain it (a folder of images has no boxes to have)
            report.problems.add(no_boxes_problem(roles.get(split_name), report.images, report.crowd_boxes,
                                                 listing_file(inner)))
    return DatasetReport(reports)
