"""Pascal VOC (``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/{split}.txt``).

VOC pixel coordinates are 1-based and inclusive; a box ``xmin..xmax`` becomes
``(xmin - 1, ymin - 1, xmax, ymax)`` in the package's 0-based xyxy convention. Every class
collapses to one "object" class (``class_names`` keeps only some). ``difficult`` objects are
left out of the ground truth by default but kept as crowd boxes: never positives, not counted by
recall, and with ``model.crowd_ioa`` set the anchors mostly inside them are neither positives
nor negatives (without it they are negatives, as anywhere else); ``keep_difficult=True`` makes
them ordinary ground truth.

The image of id ``X`` is ``JPEGImages/X.jpg``, the VOC layout that torchvision, detectron2 and
mmdetection read; where that file does not exist, the annotation's ``<filename>`` (VOC-style sets
of other formats, e.g. labelImg's PNGs), then ``X`` with ``<filename>``'s extension (files renamed
after annotation, leaving ``<filename>`` stale). The image is looked for while the annotations are
read (one ``stat`` per candidate), so an image found at none of these paths is reported then,
naming every path tried, and training and ``check-data`` read the same file.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from lightning_rpn.data.annotated import AnnotatedDataset, ImageRecord
from lightning_rpn.data.image_io import resolve_image_path
from lightning_rpn.data.problems import BadAnnotationPolicy, DataError, Problem, UnsafePathError

__all__ = ["VOCDetection", "read_split_ids"]

_DIFFICULT = {"0": False, "1": True, "false": False, "true": True}
"""The ``<difficult>`` values read (lower-cased): VOC writes 0 / 1, some export tools false / true."""


class _ImageNotFound(DataError):
    """No image file at any path an annotation may mean (:meth:`VOCDetection._image_file`)."""


_CLASS_FLAGS = frozenset({"-1", "0", "1"})
"""The second column of VOC's per-class split files (``aeroplane_train.txt``): not in / difficult / in."""


def read_split_ids(root: Path | str, split: str) -> list[str]:
    """Image ids listed in ``root/ImageSets/Main/{split}.txt`` (blank lines skipped).

    A line is an id, optionally followed by a ``-1`` / ``0`` / ``1`` class flag (the per-class
    lists); any other line (an id with a space) is a :class:`DataError` naming it.
    """
    path = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"VOC split file for split {split!r} does not exist", file=str(path))
    # utf-8-sig: a byte-order mark (Windows Notepad writes one) is not part of the first id
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    ids = [_split_line_id(line, number, str(path)) for number, line in enumerate(lines, 1) if line.strip()]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"image id {duplicate!r} is listed twice", file=str(path))
    return ids


def _split_line_id(line: str, number: int, file: str) -> str:
    """The image id of split-file line ``number``: its first column, when a class flag at most follows."""
    columns = line.split()
    if len(columns) == 1 or (len(columns) == 2 and columns[1] in _CLASS_FLAGS):
        return columns[0]
    raise DataError(f"line {number} {line.strip()!r} has {len(columns)} columns; expected an image id, optionally "
                    "followed by a -1 / 0 / 1 class flag (image ids with spaces are not supported by the VOC "
                    "format: rename such files and their annotations)", file=file)


class VOCDetection(AnnotatedDataset):
    """The images of ``split`` under a VOC ``root`` (the folder holding ``JPEGImages`` etc.).

    Args:
        root: e.g. ``VOCdevkit/VOC2007``.
        split: name of the ``ImageSets/Main`` list (``train``, ``val``, ``trainval``, ``test``).
        keep_difficult: treat ``difficult`` objects as ground truth (default: crowd boxes).
        class_names: keep only these classes (others are left out, not a problem).
        on_bad_annotation: ``"raise"`` | ``"skip"`` | ``"clip"``.
        verify_images: decode every image now (missing / corrupt / truncated / mis-sized images).
        report_unsafe_paths: record image ids and file names escaping their folder as skipped
            problems instead of raising (``check-data``).
    """

    box_format = "voc"

    def __init__(
        self,
        root: Path | str,
        split: str = "trainval",
        keep_difficult: bool = False,
        class_names: Sequence[str] | None = None,
        on_bad_annotation: BadAnnotationPolicy = "raise",
        verify_images: bool = False,
        report_unsafe_paths: bool = False,
    ) -> None:
        super().__init__(on_bad_annotation, verify_images, report_unsafe_paths)
        self.root = Path(root)
        self.split = split
        self.keep_difficult = keep_difficult
        self.class_names = None if class_names is None else set(class_names)
        self._names_seen: set[str] = set()
        split_file = str(self.root / "ImageSets" / "Main" / f"{split}.txt")
        self.split_file = split_file
        """The file listing the split's image ids (what a split-wide problem names)."""
        for image_id in self._progress(read_split_ids(self.root, split), f"Reading VOC {split}"):
            where = split_file
            try:
                xml_path = resolve_image_path(self.root / "Annotations", f"{image_id}.xml", file=where, image_id=image_id)
                where = str(xml_path)
                self.records.append(self._parse(image_id, xml_path))
            except _ImageNotFound as error:
                if self.on_bad_annotation == "raise":
                    raise DataError(f"{error.reason} (on_bad_annotation='skip' leaves such images out)",
                                    file=where, image_id=image_id) from error
                self.problems.add(Problem("unreadable_image", "skipped", error.reason, where, image_id))
            except UnsafePathError as error:
                if not self.report_unsafe_paths:
                    raise
                self.problems.add(Problem("unsafe_path", "skipped", error.reason, where, image_id))
            except DataError as error:
                if self.on_bad_annotation == "raise":
                    raise
                self.problems.add(Problem("bad_annotation_file", "skipped", error.reason, where, image_id,
                                          error.annotation_id))
        unknown = sorted((self.class_names or set()) - self._names_seen)
        if unknown:  # a misspelt name would otherwise drop every box of its class without a word
            raise DataError(f"class_names (data.category_names) {unknown} name no object of the split (names found: "
                            f"{sorted(self._names_seen)}; names are compared exactly, case included)",
                            file=split_file)
        self._note_files_listed_twice(self.records, split_file)
        self._finish()

    def _parse(self, image_id: str, xml_path: Path) -> ImageRecord:
        where = str(xml_path)
        if not xml_path.is_file():
            raise DataError("annotation file does not exist", file=where, image_id=image_id)
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as error:
            raise DataError(f"annotation XML is malformed ({error})", file=where, image_id=image_id) from error
        path = self._image_file(image_id, (tree.findtext("filename") or "").strip(), where)
        size = None
        size_node = tree.find("size")
        if size_node is not None and size_node.findtext("width") and size_node.findtext("height"):
            try:
                width, height = int(float(size_node.findtext("width"))), int(float(size_node.findtext("height")))  # type: ignore[arg-type]
            except ValueError as error:
                raise DataError(f"<size> is not numeric ({error})", file=where, image_id=image_id) from error
            size = (height, width) if width > 0 and height > 0 else None
        record = ImageRecord(image_id, path, where, size)
        boxes, ids, crowd, crowd_ids = [], [], [], []
        for index, obj in enumerate(tree.findall("object")):
            name = (obj.findtext("name") or "").strip()
            self._names_seen.add(name)
            if self.class_names is not None and name not in self.class_names:
                continue
            ann_id = f"object {index} ({name})"
            node = obj.find("bndbox")
            try:
                xmin, ymin, xmax, ymax = (float(node.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr,arg-type]
            except (AttributeError, TypeError, ValueError):
                detail = "<bndbox> is missing or has a non-numeric xmin/ymin/xmax/ymax"
                if self.on_bad_annotation == "raise":
                    raise DataError(detail, file=where, image_id=image_id, annotation_id=ann_id) from None
                self.problems.add(Problem("malformed_bbox", "skipped", detail, where, image_id, ann_id))
                continue
            box = [xmin, ymin, xmax, ymax]
            written = (obj.findtext("difficult") or "0").strip()
            difficult = _DIFFICULT.get(written.lower())
            if difficult is None:  # "yes", "2", ...: neither reading is safe to guess
                detail = f"<difficult> is {written!r}; expected 0 or 1 (or false / true)"
                if self.on_bad_annotation == "raise":
                    raise DataError(detail, file=where, image_id=image_id, annotation_id=ann_id)
                self.problems.add(Problem("bad_difficult", "skipped", detail, where, image_id, ann_id))
                continue
            if difficult and not self.keep_difficult:
                crowd.append(box)
                crowd_ids.append(ann_id)
            else:
                boxes.append(box)
                ids.append(ann_id)
        record.written_boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        record.annotation_ids = ids
        record.written_crowd_boxes = np.asarray(crowd, dtype=np.float64).reshape(-1, 4)
        record.crowd_annotation_ids = crowd_ids
        return record

    def _image_file(self, image_id: str, written: str, where: str) -> Path:
        """The first existing candidate of :meth:`_image_candidates`; none is an :class:`_ImageNotFound`."""
        tried = []
        for path, reason in self._image_candidates(image_id, written, where):
            if path.is_file():
                return path
            tried.append(f"{path} ({reason})")
        raise _ImageNotFound(f"image file does not exist; tried {', '.join(tried)}: put the image at one of "
                             "these paths or correct <filename>", file=where, image_id=image_id)

    def _image_candidates(self, image_id: str, written: str, where: str) -> Iterator[tuple[Path, str]]:
        """``(path, why)`` of each file ``image_id`` 's image may be, in the order of the module docstring.

        Lazily: ``<filename>`` is not even resolved (nor refused as unsafe) where ``{id}.jpg`` exists.
        """
        suffix = PurePosixPath(written.replace("\\", "/")).suffix
        names = [(f"{image_id}.jpg", "the image id, as VOC names images"), (written, "<filename>"),
                 (f"{image_id}{suffix}" if suffix else "", "the image id with <filename>'s extension")]
        seen: set[Path] = set()
        for name, reason in names:
            if not name:
                continue
            path = resolve_image_path(self.root / "JPEGImages", name, file=where, image_id=image_id)
            if path not in seen:
                seen.add(path)
                yield path, reason
