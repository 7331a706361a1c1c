"""COCO instances JSON as a one-class proposal dataset.

COCO boxes are ``(x, y, w, h)``; they become ``(x1, y1, x2, y2)``. Every category collapses to
one "object" class; ``category_ids`` / ``category_names`` keep only some categories (the
others are left out, which is not a problem). ``iscrowd`` annotations become crowd boxes,
kept apart from the ground truth (excluded from anchor matching and from recall), or are
dropped with ``include_crowd=False``. Images without annotations are valid (empty).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lightning_rpn.data.annotated import AnnotatedDataset, ImageRecord
from lightning_rpn.data.image_io import resolve_image_path
from lightning_rpn.data.problems import BadAnnotationPolicy, DataError, Problem, UnsafePathError

__all__ = ["COCODetection", "load_coco_json"]


def load_coco_json(annotation_file: Path | str) -> dict[str, Any]:
    """The parsed JSON, with ``images`` and ``annotations`` lists checked to exist."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DataError("COCO annotation file does not exist", file=str(path))
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"not valid JSON ({error})", file=str(path)) from error
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object with 'images' and 'annotations', got {type(data).__name__}", file=str(path))
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"missing or non-list {key!r}; expected a COCO instances file", file=str(path))
    return data


class COCODetection(AnnotatedDataset):
    """Images under ``images_root`` with boxes from the COCO instances file ``annotation_file``.

    Args:
        images_root: folder the ``file_name`` s are relative to (they may not escape it).
        annotation_file: the instances JSON.
        category_ids / category_names: keep only these categories (both may be given).
        include_crowd: keep ``iscrowd`` boxes as crowd boxes (True) or drop them.
        on_bad_annotation: ``"raise"`` | ``"skip"`` | ``"clip"`` (see ``problems``); an image
            entry without ``id`` / ``file_name``, with a duplicate id or a bad size raises, or
            is skipped with its annotations.
        verify_images: decode every image now (missing / corrupt / truncated / mis-sized images).
        report_unsafe_paths: record ``file_name`` s escaping ``images_root`` as skipped problems
            instead of raising (``check-data``).
    """

    box_format = "xywh"

    def __init__(
        self,
        images_root: Path | str,
        annotation_file: Path | str,
        category_ids: Sequence[int] | None = None,
        category_names: Sequence[str] | None = None,
        include_crowd: bool = True,
        on_bad_annotation: BadAnnotationPolicy = "raise",
        verify_images: bool = False,
        report_unsafe_paths: bool = False,
    ) -> None:
        super().__init__(on_bad_annotation, verify_images, report_unsafe_paths)
        self.images_root = Path(images_root)
        self.annotation_file = str(annotation_file)
        data = load_coco_json(annotation_file)
        self.category_ids = self._select_categories(data, category_ids, category_names)
        self.kept_category_ids = self._kept_categories(data)
        records, dropped = self._parse_images(data["images"])
        self._parse_annotations(data["annotations"], records, dropped, include_crowd)
        self.records = list(records.values())
        self._finish()

    def _select_categories(
        self, data: dict[str, Any], ids: Sequence[int] | None, names: Sequence[str] | None
    ) -> set[int] | None:
        if ids is None and names is None:
            return None
        categories = data.get("categories") or []
        by_name = {c.get("name"): c.get("id") for c in categories if isinstance(c, dict)}
        known_ids = set(by_name.values())
        selected: set[int] = set()
        for name in names or []:
            if name not in by_name:
                raise DataError(
                    f"category_names: {name!r} is not a category; known: {sorted(map(str, by_name))}",
                    file=self.annotation_file,
                )
            selected.add(by_name[name])
        for cat_id in ids or []:
            if known_ids and cat_id not in known_ids:
                raise DataError(
                    f"category_ids: {cat_id!r} is not a category id; known: {sorted(known_ids)}",
                    file=self.annotation_file,
                )
            selected.add(cat_id)
        return selected

    def _kept_categories(self, data: dict[str, Any]) -> tuple[int, ...]:
        """The integer category ids whose boxes this dataset keeps: the filter, else the file's
        ``categories`` (what a class-agnostic results file must name, see ``ProposalWriter``)."""
        if self.category_ids is not None:
            ids: list[Any] = list(self.category_ids)
        else:
            ids = [c.get("id") for c in data.get("categories") or [] if isinstance(c, dict)]
        return tuple(sorted(i for i in ids if isinstance(i, int) and not isinstance(i, bool)))

    def _parse_images(self, images: list[Any]) -> tuple[dict[Any, ImageRecord], set[Any]]:
        """Records by image id, and the ids of image entries skipped (their annotations go with them)."""
        records: dict[Any, ImageRecord] = {}
        dropped: set[Any] = set()
        for entry in self._progress(images, "Reading COCO images"):
            image_id = entry.get("id") if isinstance(entry, dict) else None
            try:
                records[image_id] = self._parse_image(entry, records)
            except UnsafePathError as error:
                if not self.report_unsafe_paths:
                    raise
                self.problems.add(Problem("unsafe_path", "skipped", error.reason, self.annotation_file, image_id))
                dropped.add(image_id)
            except DataError as error:
                if self.on_bad_annotation == "raise":
                    raise
                self.problems.add(Problem("bad_image_entry", "skipped", error.reason, self.annotation_file, image_id))
                if image_id is not None and image_id not in records:
                    dropped.add(image_id)
        return records, dropped

    def _parse_image(self, entry: Any, records: dict[Any, ImageRecord]) -> ImageRecord:
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise DataError(f"image entry {entry!r} lacks 'id' or 'file_name'", file=self.annotation_file)
        image_id = entry["id"]
        if image_id in records:
            raise DataError(f"duplicate image id: {entry['file_name']!r} has the id of "
                            f"{records[image_id].file.name!r}", file=self.annotation_file, image_id=image_id)
        path = resolve_image_path(self.images_root, entry["file_name"], file=self.annotation_file, image_id=image_id)
        width, height = entry.get("width"), entry.get("height")
        size = None
        if width is not None or height is not None:
            if not all(isinstance(v, (int, float)) and v > 0 for v in (width, height)):
                raise DataError(f"image width/height {width!r}/{height!r} must be positive numbers",
                                file=self.annotation_file, image_id=image_id)
            size = (int(height), int(width))
        return ImageRecord(image_id, path, self.annotation_file, size)

    def _parse_annotations(
        self, annotations: list[Any], records: dict[Any, ImageRecord], dropped: set[Any], include_crowd: bool
    ) -> None:
        boxes: dict[Any, list[list[float]]] = defaultdict(list)
        ids: dict[Any, list[Any]] = defaultdict(list)
        crowd: dict[Any, list[list[float]]] = defaultdict(list)
        crowd_ids: dict[Any, list[Any]] = defaultdict(list)
        as_text: dict[str, Any] | None = None  # the image ids as strings, once an annotation misses
        for ann in self._progress(annotations, "Reading COCO annotations"):
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            if self.category_ids is not None and isinstance(ann, dict) and ann.get("category_id") not in self.category_ids:
                continue
            bbox = ann.get("bbox") if isinstance(ann, dict) else None
            problem = None
            if image_id in dropped:
                continue  # its image entry was skipped and reported
            if image_id not in records:
                if as_text is None:  # 1 and "1" are different ids in JSON: name the near miss
                    as_text = {str(known): known for known in records}
                near = as_text.get(str(image_id))
                hint = "" if near is None else f" ('images' has {near!r})"
                problem = ("unknown_image", f"annotation refers to image id {image_id!r}, which is not in 'images'{hint}")
            elif not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
                isinstance(v, (int, float)) or v is None for v in bbox
            ):
                problem = ("malformed_bbox", f"bbox {bbox!r} is not 4 numbers (x, y, w, h)")
            if problem is not None:
                if self.on_bad_annotation == "raise":
                    raise DataError(problem[1] + " (set on_bad_annotation='skip' to drop it)",
                                    file=self.annotation_file, image_id=image_id, annotation_id=ann_id)
                self.problems.add(Problem(problem[0], "skipped", problem[1], self.annotation_file, image_id, ann_id))
                continue
            written = [float("nan") if v is None else float(v) for v in bbox]  # type: ignore[union-attr]
            if ann.get("iscrowd", 0):
                if include_crowd:
                    crowd[image_id].append(written)
                    crowd_ids[image_id].append(ann_id)
            else:
                boxes[image_id].append(written)
                ids[image_id].append(ann_id)
        for image_id, record in records.items():
            record.written_boxes = np.asarray(boxes.get(image_id, []), dtype=np.float64).reshape(-1, 4)
            record.annotation_ids = ids.get(image_id, [])
            record.written_crowd_boxes = np.asarray(crowd.get(image_id, []), dtype=np.float64).reshape(-1, 4)
            record.crowd_annotation_ids = crowd_ids.get(image_id, [])
