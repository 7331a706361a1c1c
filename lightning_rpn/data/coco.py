"""COCO instances JSON as a one-class proposal dataset.

COCO boxes are ``(x, y, w, h)``; they become ``(x1, y1, x2, y2)``. Every category collapses to
one "object" class; ``category_ids`` / ``category_names`` keep only some categories (the
others are left out, which is not a problem; a name selects every category of that name, as
merged label sets may give one name several ids; a selection that keeps no annotation of the
file is an error). An annotation whose ``category_id`` is missing or not in ``categories`` is kept,
as is one that reuses another's ``id``: both are warnings. ``iscrowd`` (0 or 1, also written
0.0 / 1.0 or false / true; anything else is an error) annotations become crowd boxes, kept apart from the ground
truth (excluded from anchor matching and from recall), or are dropped with
``include_crowd=False``. Images without annotations are valid (empty). Messages quote values as
the file writes them (``null``, ``true``) and name an annotation without ``id`` by its position
(``annotations[3]``).

``area`` (the object's area in pixels: its segmentation's, on COCO) is what sorts a ground-truth
box into the recall's area ranges (``AR_small`` / ``medium`` / ``large``), as COCOeval and
detectron2 sort it; samples carry it as ``DetectionSample.annotation_areas``. An ``area`` that is
not a number >= 0 (negative, as a signed polygon formula gives, NaN, infinite, a string,
``null``) leaves its box as it is and the file without areas (a ``bad_area`` warning). A file
where some ground-truth annotations have no ``area`` gives none at all (a ``missing_area``
problem says so): one measure sorts every box of a file, never the annotation's
area for some and the box's for others; a file without any ``area`` sorts by the box area, as
VOC and the other sources do.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lightning_rpn.data.annotated import AnnotatedDataset, ImageRecord, gc_paused
from lightning_rpn.data.image_io import resolve_image_path
from lightning_rpn.data.problems import (
    AnnotationRef,
    BadAnnotationPolicy,
    DataError,
    Problem,
    ProblemLog,
    UnsafePathError,
    as_written,
    quoted,
    sanitize_boxes,
)
from lightning_rpn.data.sample import DetectionSample

__all__ = ["COCODetection", "load_coco_json"]


def load_coco_json(annotation_file: Path | str) -> dict[str, Any]:
    """The parsed JSON, with ``images`` and ``annotations`` lists checked to exist."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DataError("COCO annotation file does not exist", file=str(path))
    try:
        with open(path, encoding="utf-8-sig") as handle:  # a byte-order mark (Windows tools write one) is skipped
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"not valid JSON ({error})", file=str(path)) from error
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object with 'images' and 'annotations', got {type(data).__name__}", file=str(path))
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"missing or non-list {key!r}; expected a COCO instances file", file=str(path))
    categories = data.get("categories")
    if categories is not None and not isinstance(categories, list):  # null or none: no categories
        raise DataError(f"non-list 'categories' ({quoted(categories)}); expected a list of objects with "
                        "'id' and 'name'", file=str(path))
    return data


class COCODetection(AnnotatedDataset):
    """Images under ``images_root`` with boxes from the COCO instances file ``annotation_file``.

    Args:
        images_root: folder the ``file_name`` s are relative to (they may not escape it).
        annotation_file: the instances JSON.
        category_ids / category_names: keep only these categories (both may be given; a name
            selects every category of that name).
        include_crowd: keep ``iscrowd`` boxes as crowd boxes (True) or drop them.
        on_bad_annotation: ``"raise"`` | ``"skip"`` | ``"clip"`` (see ``problems``); an image
            entry without ``id`` / ``file_name`` (an id null is none), with a duplicate id or a
            bad size raises, or is skipped with its annotations; an entry of ``annotations``
            that is no object (named by its position) raises or is skipped. An id listed by
            several image entries (files merged without renumbering) is ambiguous: every entry
            of it is skipped, with every annotation of the id (one problem per id, naming the files).
        verify_images: decode every image now (missing / corrupt / truncated / mis-sized images).
        report_unsafe_paths: record ``file_name`` s escaping ``images_root`` as skipped problems
            instead of raising (``check-data``).

    ``annotation_areas``: each image id's ground-truth ``area`` s (float64 ``[G]``, in the order of
    its record's written boxes), or ``None`` when the file does not give every ground-truth
    annotation one (see the module docstring); items carry those of the boxes they keep.
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
        with gc_paused():
            data = load_coco_json(annotation_file)
            self.category_ids = self._select_categories(data, category_ids, category_names)
            self.kept_category_ids = self._kept_categories(data)
            self._category_names = {_hashable(c.get("id")): c.get("name") for c in data.get("categories") or []
                                    if isinstance(c, dict)}
            records, dropped = self._parse_images(data["images"], data["annotations"])
            self._note_files_listed_twice(list(records.values()), self.annotation_file)
            selected, self.annotation_areas = self._parse_annotations(data["annotations"], records, dropped,
                                                                      include_crowd)
            self._records_by_id: dict[Any, ImageRecord] | None = None  # built when an item first needs it
            self._check_selection_kept_some(selected, category_ids, category_names)
            self.records = list(records.values())
            del data  # freed (by reference counting) before the collector resumes, which would walk it all
        self._finish()

    def _check_selection_kept_some(
        self, selected: Counter[Any], ids: Sequence[int] | None, names: Sequence[str] | None
    ) -> None:
        """Raise when the category filter left out every annotation of the file (``selected``: the
        category id of each annotation it saw, and whether it kept it), as a misspelt or wrong
        category would otherwise leave a split without a box."""
        if self.category_ids is None or not selected or any(kept for (_, kept) in selected):
            return
        chosen = " and ".join(f"category_{kind} (data.category_{kind}) {list(value)!r}"
                              for kind, value in (("ids", ids), ("names", names)) if value is not None)
        used: Counter[Any] = Counter()
        for (category, _), n in selected.items():
            used[category] += n
        listed = ", ".join(as_written(category) + (f" ({as_written(self._category_names[category])})" if category
                                                    in self._category_names else "") + f": {n}"
                           for category, n in used.most_common(10))
        raise DataError(f"the category filter {chosen} keeps none of the file's {sum(used.values())} annotations "
                        f"(annotations per category_id: {listed}{', ...' if len(used) > 10 else ''}); choose "
                        "categories that the annotations use", file=self.annotation_file)

    def _select_categories(
        self, data: dict[str, Any], ids: Sequence[int] | None, names: Sequence[str] | None
    ) -> set[int] | None:
        if ids is None and names is None:
            return None
        categories = data.get("categories") or []
        by_name: dict[Any, set[Any]] = {}  # a name may be given to several ids (merged label sets): all are kept
        for c in categories:
            if isinstance(c, dict):
                by_name.setdefault(_hashable(c.get("name")), set()).add(_hashable(c.get("id")))
        known_ids = set().union(*by_name.values())
        selected: set[int] = set()
        for name in names or []:
            if name not in by_name:
                known_names = as_written(sorted(by_name, key=as_written))
                raise DataError(
                    f"category_names: {name!r} is not a category; known: {known_names}",
                    file=self.annotation_file,
                )
            selected |= by_name[name]
        for cat_id in ids or []:
            if known_ids and cat_id not in known_ids:
                raise DataError(
                    f"category_ids: {cat_id!r} is not a category id; "
                    f"known: {as_written(sorted(known_ids, key=repr))}",
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

    def _parse_images(self, images: list[Any], annotations: list[Any]) -> tuple[dict[Any, ImageRecord], set[Any]]:
        """Records by image id, and the ids of image entries skipped (their annotations go with them).

        An id listed by several entries raises under ``"raise"``; else every entry of it is
        skipped (each still checked, so its other problems are reported) with every annotation of
        the id, which none of them can be told to own, and one problem per id says so.
        """
        records: dict[Any, ImageRecord] = {}
        dropped: set[Any] = set()
        shared: dict[Any, tuple[list[Any], int]] = {}  # file names and annotation count of each shared id
        names_of = {} if self.on_bad_annotation == "raise" else _shared_image_ids(images)
        if names_of:  # one more pass over the annotations, for files with such ids only
            counts = Counter(_hashable(a.get("image_id")) for a in annotations if isinstance(a, dict))
            shared = {image_id: (names, counts[image_id]) for image_id, names in names_of.items()}
        for entry in self._progress(images, "Reading COCO images"):
            image_id = _hashable(entry.get("id")) if isinstance(entry, dict) else None
            try:
                if image_id in shared:
                    self._skip_shared_id(entry, image_id, shared, dropped)
                    continue
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

    def _skip_shared_id(
        self, entry: dict[str, Any], image_id: Any, shared: dict[Any, tuple[list[Any], int]], dropped: set[Any]
    ) -> None:
        """Skip ``entry``, whose id ``image_id`` other entries have too (``shared``: the file names
        and the number of annotations of each such id), recording the problem at the id's first
        entry; raise the entry's own problems (:meth:`_parse_image`) for :meth:`_parse_images` to report."""
        if image_id not in dropped:
            dropped.add(image_id)
            names, count = shared[image_id]
            n, quoted, written_id = len(names), [as_written(name) for name in names], as_written(image_id)
            listed = f"{', '.join(quoted[:-1])} and {quoted[-1]} {'both' if n == 2 else 'all'} have id {written_id}"
            self.problems.add(Problem(
                "bad_image_entry", "skipped",
                f"duplicate image id: {listed}, so its annotations could belong to {'either' if n == 2 else 'any'}; "
                f"{'both' if n == 2 else f'all {n}'} entries are skipped, with the {count} "
                f"annotation{'' if count == 1 else 's'} of image id {written_id} (give every image entry its own "
                "id, e.g. renumber the ids of merged files)",
                self.annotation_file, image_id))
        self._parse_image(entry, {})

    def _parse_image(self, entry: Any, records: dict[Any, ImageRecord]) -> ImageRecord:
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise DataError(f"image entry {quoted(entry)} lacks 'id' or 'file_name'", file=self.annotation_file)
        image_id = entry["id"]
        if image_id is None or _hashable(image_id) is not image_id:  # null, a list, an object: no id to name
            raise DataError(f"image id {as_written(image_id)} of {as_written(entry['file_name'])} is not a number "
                            "or a string", file=self.annotation_file, image_id=_hashable(image_id))
        if image_id in records:
            raise DataError(f"duplicate image id: {as_written(entry['file_name'])} has the id of "
                            f"{records[image_id].file.name!r}", file=self.annotation_file, image_id=image_id)
        path = self._image_path(entry["file_name"], image_id)
        width, height = entry.get("width"), entry.get("height")
        size = None
        if width is not None or height is not None:
            if not (_is_positive_number(width) and _is_positive_number(height)):
                raise DataError(f"image width/height {quoted(width)}/{quoted(height)} must be positive "
                                "numbers",
                                file=self.annotation_file, image_id=image_id)
            size = (int(height), int(width))
        return ImageRecord(image_id, path, self.annotation_file, size)

    def _image_path(self, name: Any, image_id: Any) -> Path:
        """The image file ``name`` under ``images_root``, as :func:`resolve_image_path` gives it.

        A plain name (what COCO writes) is joined as it is: its checks and normalization cost
        more than the rest of an image entry, and change nothing for such a name.
        """
        if type(name) is str and _PLAIN_NAME.fullmatch(name):
            return self.images_root / name
        return resolve_image_path(self.images_root, name, file=self.annotation_file, image_id=image_id)

    def _parse_annotations(
        self, annotations: list[Any], records: dict[Any, ImageRecord], dropped: set[Any], include_crowd: bool
    ) -> tuple[Counter[Any], dict[Any, np.ndarray] | None]:
        """Fill the records' boxes; return, with a category filter, the ``(category_id, kept by the
        filter)`` of every annotation it saw, counted (for :meth:`_check_selection_kept_some`, which
        reads nothing else), and the ground-truth areas by image id (``annotation_areas``).

        Most annotations of a file are clean: :meth:`_add_if_clean` takes those with a few cheap
        tests, and every other annotation goes through the detailed checks of
        :meth:`_add_checked`, which find and report its problems.
        """
        sink = _AnnotationSink(records, dropped, include_crowd)
        self._images_as_text: dict[str, Any] | None = None  # the image ids as strings, once an annotation misses
        add_if_clean = self._add_if_clean
        for position, ann in enumerate(self._progress(annotations, "Reading COCO annotations")):
            if not add_if_clean(ann, sink):
                self._add_checked(ann, position, sink, records, dropped)
        areas = sink.store(list(records.values()))
        if sink.first_bad_area is not None:
            image_id, ann_id, detail = sink.first_bad_area
            self.problems.add(Problem(
                "bad_area", "kept",
                f"{detail}, and {sink.bad_areas} annotation(s) of the file in all have an 'area' that is no number "
                ">= 0: their boxes are kept, and AR_small / AR_medium / AR_large sort every box of the file by its "
                "box area instead of its annotation's area",
                self.annotation_file, image_id, ann_id))
            return sink.selected, None
        if sink.first_missing_area is not None and sink.missing_areas < sink.ground_truth:
            position, ann_id = sink.first_missing_area
            image_id = list(records)[position]
            self.problems.add(Problem(
                "missing_area", "kept",
                f"{sink.missing_areas} of the file's {sink.ground_truth} ground-truth annotations (this one first) "
                "have no 'area', so AR_small / AR_medium / AR_large sort every box of the file by its box area "
                "instead of its annotation's area; give every annotation its area (or none)",
                self.annotation_file, image_id, ann_id))
        return sink.selected, areas

    def _add_if_clean(self, ann: Any, sink: _AnnotationSink) -> bool:
        """Add ``ann`` to ``sink`` and return True when it is plainly clean: a dict whose integer
        ``id`` is new, whose integer or string ``image_id`` is a kept image, whose integer
        ``category_id`` is in ``categories`` (or the file lists none), whose ``bbox`` is a list
        of 4 ints / floats, whose ``iscrowd``, if any, is 0 or 1 (an int or a float) and whose
        ``area``, if any, is an int / float in [0, float64's largest]. Else return False having
        changed nothing, for :meth:`_add_checked`.

        This is the common case of :meth:`_add_checked` without its per-field checks (which made
        reading a train2017-sized file take 3x as long as pycocotools), so it must agree with
        them: every annotation it takes is one they pass without a problem, added as they add it.
        """
        if type(ann) is not dict:
            return False
        image_id, ann_id, category = ann.get("image_id"), ann.get("id"), ann.get("category_id")
        if (type(image_id) is not int and type(image_id) is not str) or type(ann_id) is not int \
                or type(category) is not int:
            return False
        position = sink.positions.get(image_id)
        known = self._category_names
        if position is None or ann_id in sink.first_use or (known and category not in known):
            return False
        bbox, crowd, area = ann.get("bbox"), ann.get("iscrowd", 0), ann.get("area", _NO_AREA)
        if type(bbox) is not list or len(bbox) != 4 or type(crowd) not in _NUMBERS or crowd not in (0, 1):
            return False
        if area is not _NO_AREA and (type(area) not in _NUMBERS or not 0 <= area <= _LARGEST):
            return False
        x, y, w, h = bbox
        if type(x) not in _NUMBERS or type(y) not in _NUMBERS or type(w) not in _NUMBERS or type(h) not in _NUMBERS:
            return False
        sink.first_use[ann_id] = image_id
        if self.category_ids is not None:
            kept = category in self.category_ids
            sink.selected[(category, kept)] += 1
            if not kept:
                return True
        sink.add(position, bbox, ann_id, crowd == 1, area)
        return True

    def _add_checked(
        self, ann: Any, position: int, sink: _AnnotationSink, records: dict[Any, ImageRecord], dropped: set[Any]
    ) -> None:
        """Add ``ann``, entry ``position`` of 'annotations', to ``sink`` after checking each field,
        reporting (or raising for) what is wrong."""
        if not isinstance(ann, dict):  # no field to read: named by its position
            self._skip_annotation("bad_annotation_entry", f"annotations[{position}] is {quoted(ann)}, not an object "
                                  "with image_id and bbox", None, None)
            return
        ann_id = ann.get("id")
        image_id = _hashable(ann.get("image_id"))
        if image_id in dropped:
            return  # its image entry was skipped and reported
        named = "" if ann_id is not None else f"annotations[{position}] (no id): "  # what names it in a message
        self._check_id_unique(ann_id, image_id, sink.first_use)
        kept = self._category_kept(ann, ann_id, image_id, named)
        if self.category_ids is not None:
            sink.selected[(_hashable(ann.get("category_id")), kept)] += 1
        if not kept:
            return
        problem = self._annotation_problem(ann, image_id, records)
        if problem is not None:
            self._skip_annotation(problem[0], named + problem[1], image_id, ann_id)
            return
        area = ann.get("area", _NO_AREA)
        if area is not _NO_AREA and (type(area) not in _NUMBERS or not 0 <= area <= _LARGEST):
            kind = ("a string" if isinstance(area, str) else "not a number" if type(area) not in _NUMBERS
                    else "negative" if area < 0 else "not finite" if type(area) is float else "too large")
            sink.bad_areas += 1
            if sink.first_bad_area is None:
                sink.first_bad_area = (image_id, ann_id, f"{named}area {quoted(area)} is {kind}")
            area = _NO_AREA  # the box is good: only the area ranges lose this file's areas
        sink.add(sink.positions[image_id], [_as_float(v) for v in ann["bbox"]], ann_id, bool(ann.get("iscrowd", 0)),
                 area)

    def _skip_annotation(self, kind: str, detail: str, image_id: Any, ann_id: Any) -> None:
        """Raise for an unusable annotation under ``"raise"``, else record it as skipped."""
        if self.on_bad_annotation == "raise":
            raise DataError(detail + " (set on_bad_annotation='skip' to drop it)",
                            file=self.annotation_file, image_id=image_id, annotation_id=ann_id)
        self.problems.add(Problem(kind, "skipped", detail, self.annotation_file, image_id, ann_id))

    def _check_id_unique(self, ann_id: Any, image_id: Any, first_use: dict[Any, Any]) -> None:
        """Record a warning when ``ann_id`` was used before: messages naming it would be ambiguous."""
        if ann_id is None or not isinstance(ann_id, (int, float, str)):
            return
        if ann_id in first_use:
            self.problems.add(Problem(
                "duplicate_annotation_id", "kept",
                f"annotation id {as_written(ann_id)} is used again (first by an annotation of image "
                f"{as_written(first_use[ann_id])}), "
                "so problems naming it are ambiguous; give each annotation its own id",
                self.annotation_file, image_id, ann_id))
        else:
            first_use[ann_id] = image_id

    def _category_kept(self, ann: dict[str, Any], ann_id: Any, image_id: Any, named: str) -> bool:
        """Whether the category filter keeps ``ann``; a ``category_id`` that is missing or not in the
        file's ``categories`` (when it has any) is a warning, the box kept (one class) unless filtered
        out (``named``: what starts the warning, naming an annotation without id)."""
        category = _hashable(ann.get("category_id"))
        kept = self.category_ids is None or category in self.category_ids
        known = self._category_names
        if known and category not in known:
            near = next((k for k in known if str(k) == str(category)), None) if "category_id" in ann else None
            detail = ("the annotation has no category_id" if "category_id" not in ann else
                      f"category_id {as_written(ann['category_id'])} is not an id of 'categories'"
                      + ("" if near is None else f" ('categories' has {as_written(near)})"))
            outcome = "every category is one class" if kept else "not a category the filter selects"
            self.problems.add(Problem("unknown_category", "kept" if kept else "skipped", f"{named}{detail}; {outcome}",
                                      self.annotation_file, image_id, ann_id))
        return kept

    def _annotation_problem(
        self, ann: dict[str, Any], image_id: Any, records: dict[Any, ImageRecord]
    ) -> tuple[str, str] | None:
        """``(kind, detail)`` of what makes ``ann`` unusable (unknown image, malformed bbox, bad iscrowd), else None."""
        if "image_id" not in ann:
            return "unknown_image", "the annotation has no image_id; expected the id of an entry of 'images'"
        if image_id not in records:
            if self._images_as_text is None:  # 1 and "1" are different ids in JSON: name the near miss
                self._images_as_text = {str(known): known for known in records}
            near = self._images_as_text.get(str(image_id))
            hint = "" if near is None else f" ('images' has {as_written(near)})"
            return "unknown_image", (f"annotation refers to image id {as_written(ann['image_id'])}, which is not in "
                                     f"'images'{hint}")
        if "bbox" not in ann:
            return "malformed_bbox", "the annotation has no bbox; expected 4 numbers (x, y, w, h)"
        bbox = ann["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            return "malformed_bbox", f"bbox {as_written(bbox)} is not 4 numbers (x, y, w, h)"
        crowd = ann.get("iscrowd", 0)
        if not isinstance(crowd, (int, float)) or crowd not in (0, 1):  # 0.0 / 1.0 as pycocotools reads them
            kind = "a string" if isinstance(crowd, str) else "not 0 or 1"
            return "bad_iscrowd", (f"iscrowd {as_written(crowd)} is {kind}; expected the number 0 or 1 "
                                   "(or false / true)")
        return None

    def __getitem__(self, index: int) -> DetectionSample:
        sample = super().__getitem__(index)
        if self.annotation_areas is not None:
            sample.set_annotation_areas(self._kept_areas(sample))
        return sample

    def _kept_areas(self, sample: DetectionSample) -> np.ndarray:
        """The annotation areas of ``sample`` 's boxes: its image's, less those of the boxes its checks
        dropped (``skip`` / ``clip``), found by checking its written boxes again at the size they
        were checked at, each box's position as its id."""
        areas = self.annotation_areas[sample.image_id]  # type: ignore[index]
        if len(areas) == len(sample.boxes):
            return areas
        if self._records_by_id is None:
            self._records_by_id = {record.image_id: record for record in self.records}
        written = self._records_by_id[sample.image_id].written_boxes
        assert sample.original_size is not None
        _, kept = sanitize_boxes(written, list(range(len(written))), sample.original_size, self.on_bad_annotation,
                                 AnnotationRef(self.annotation_file, sample.image_id), ProblemLog(), self.box_format)
        return areas[np.asarray(kept, dtype=np.intp)]


_PLAIN_NAME = re.compile(r"[\w-][\w.-]*(?:/[\w-][\w.-]*)*")
"""A relative path of letters, digits, ``_``, ``-`` and ``.``, no part starting with a dot (so
none is ``.`` or ``..``): nothing that :func:`resolve_image_path` refuses or normalizes."""


def _shared_image_ids(images: list[Any]) -> dict[Any, list[Any]]:
    """The ``file_name`` s (as written) of each image id that several image entries list (a
    missing, null or unhashable id is an error of its own)."""
    ids = [entry.get("id") for entry in images if isinstance(entry, dict)]
    try:
        if len(set(ids)) == len(ids):  # the common case, at a fraction of the cost of the loop below
            return {}
    except TypeError:  # an unhashable id
        pass
    names: dict[Any, list[Any]] = {}
    for entry in images:
        if isinstance(entry, dict) and entry.get("id") is not None and _hashable(entry["id"]) is entry["id"]:
            names.setdefault(entry["id"], []).append(entry.get("file_name"))
    return {image_id: files for image_id, files in names.items() if len(files) > 1}


def _is_positive_number(value: Any) -> bool:
    """Whether an image entry's ``width`` / ``height`` is usable: positive and finite (Python's json
    reads ``Infinity``) and no integer past float64, which the box checks could not compare."""
    return isinstance(value, (int, float)) and 0 < value <= sys.float_info.max


def _as_float(value: int | float) -> float:
    """A bbox number as float64; an integer past its range (over 308 digits) is infinite, as
    ``1e400`` reads, for the box checks to report as non-finite."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


_NUMBERS = frozenset((int, float))
"""The types of a bbox value that :meth:`COCODetection._add_if_clean` takes as they are."""

_LARGEST = sys.float_info.max
"""The largest ``area`` taken: ``Infinity`` and an integer past float64's range are no areas."""

_NO_AREA = float("nan")
"""What an annotation without ``area`` reads as: NaN once stored, and no other NaN reaches the
boxes (a file's NaN is a bad area, as ``null`` is), so it is told apart by identity when read."""


class _AnnotationSink:
    """What reading the annotations collects: every usable box in file order (its 4 numbers as
    written, the position of its image's record, its annotation id, its area), the image id of
    the first annotation with each id, and the ``(category_id, kept)`` counts of a category
    filter; once stored, how many ground-truth boxes there are and have no area (the first
    one's record position and annotation id)."""

    def __init__(self, records: dict[Any, ImageRecord], dropped: set[Any], include_crowd: bool) -> None:
        self.positions = {image_id: k for k, image_id in enumerate(records) if image_id not in dropped}
        """The record position of each image whose annotations are read."""
        self.num_records = len(records)
        self.include_crowd = include_crowd
        self.values: list[float] = []
        self.owners: list[int] = []  # a crowd box's owner is its record's position + num_records
        self.ids: list[Any] = []
        self.first_use: dict[Any, Any] = {}
        self.selected: Counter[Any] = Counter()
        self.areas: list[float] = []
        self.ground_truth = self.missing_areas = 0
        self.first_missing_area: tuple[int, Any] | None = None
        self.bad_areas = 0
        self.first_bad_area: tuple[Any, Any, str] | None = None  # (image id, annotation id, what is wrong)

    def add(self, position: int, box: list[float], ann_id: Any, crowd: bool, area: float) -> None:
        """Add a usable annotation's box (4 numbers) and ``area`` (a number >= 0, or ``_NO_AREA``)
        to the record at ``position``; a crowd box is dropped unless crowd boxes are kept."""
        if crowd:
            if not self.include_crowd:
                return
            position += self.num_records
        self.values += box
        self.owners.append(position)
        self.ids.append(ann_id)
        self.areas.append(area)

    def store(self, records: list[ImageRecord]) -> dict[Any, np.ndarray] | None:
        """Give each record its boxes and annotation ids, in file order, the boxes as float64
        ``[G, 4]`` arrays: views of one array converted at once and grouped by one stable sort
        (converting image by image, in the file's scattered order, cost more than the rest).
        Returns each record's ground-truth areas by image id (views, as the boxes), or ``None``
        where a ground-truth box has none."""
        owners = np.asarray(self.owners, dtype=np.intp)
        order = np.argsort(owners, kind="stable")
        try:
            values = np.asarray(self.values, dtype=np.float64)
        except OverflowError:  # an integer past float64, which a clean annotation may hold
            values = np.asarray([_as_float(v) for v in self.values], dtype=np.float64)
        rows = values.reshape(-1, 4)[order]
        ids = [self.ids[i] for i in order.tolist()]
        ends = np.cumsum(np.bincount(owners, minlength=2 * self.num_records)).tolist()
        starts = [0] + ends[:-1]
        for k, record in enumerate(records):
            first, last = starts[k], ends[k]
            record.written_boxes, record.annotation_ids = rows[first:last], ids[first:last]
            first, last = starts[self.num_records + k], ends[self.num_records + k]
            record.written_crowd_boxes, record.crowd_annotation_ids = rows[first:last], ids[first:last]
        areas = np.asarray(self.areas, dtype=np.float64)  # each >= 0, or NaN: none given
        ground_truth = owners < self.num_records
        missing = ground_truth & np.isnan(areas)
        self.ground_truth, self.missing_areas = int(ground_truth.sum()), int(missing.sum())
        if self.missing_areas:
            first = int(missing.argmax())
            self.first_missing_area = (self.owners[first], self.ids[first])
            return None
        in_order = areas[order]
        return {record.image_id: in_order[starts[k]:ends[k]] for k, record in enumerate(records)}


def _hashable(value: Any) -> Any:
    """``value``, or its ``repr`` where it cannot be a dict key or set member (a list in a broken file)."""
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value
