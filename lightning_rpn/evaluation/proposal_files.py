"""Proposal files for a second stage: COCO results JSON and detectron2 precomputed proposals.

Shapes: ``P`` proposals of an image. A *proposal record* is a mapping
``{"image_id": int | str, "boxes": [P, 4] xyxy float32 (original-image pixels), "scores": [P]}``
(objectness probabilities, best first), optionally with ``"objectness_logits": [P]``: what
:meth:`lightning_rpn.training.module.RPNModule.predict_step` returns per image (logits included), and
what the readers return (as tensors).

Formats:

* COCO results JSON: a list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``,
  class-agnostic (one category id for every proposal). That id must be one of the annotation
  file's categories: pycocotools' class-agnostic evaluation (``params.useCats = 0``) still
  keeps only results whose category the annotation file lists (``ProposalWriter`` takes the
  dataset's). Images without proposals do not appear. Coordinates are rounded to
  ``decimals`` (default 0.01 px) to keep files small.
* detectron2 precomputed proposals (``DATASETS.PROPOSAL_FILES_TRAIN`` / ``..._TEST``): a pickle
  of ``{"ids": [image ids], "boxes": [float32 [P, 4] xyxy], "objectness_logits": [float32 [P]],
  "bbox_mode": 0}`` (``BoxMode.XYXY_ABS``). The logits are the records' ``objectness_logits``
  (the model's own, which keep the order of proposals whose float32 probabilities all round to
  1.0); a record without them gets ``logit(score)``, which cannot tell such proposals apart.

Every file is written to a temporary name next to it and moved into place with ``os.replace``,
so a reader never sees a partial file; the temporary files a killed process left
(``.{name}.tmp{pid}``) are removed by :func:`remove_stale_temporaries`. Plain Python and torch (no Lightning):
:class:`~lightning_rpn.training.proposal_writer.ProposalWriter` is the Lightning callback that
writes both for a ``predict`` run, DDP included.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from lightning_rpn._files import atomic_write

__all__ = [
    "FORMATS",
    "proposal_records",
    "write_coco_proposals",
    "read_coco_proposals",
    "write_detectron2_proposals",
    "read_detectron2_proposals",
    "merge_proposal_parts",
    "MergedParts",
    "remove_stale_temporaries",
]

FORMATS: dict[str, str] = {"coco_json": "proposals_coco.json", "detectron2_pkl": "proposals_detectron2.pkl"}
"""Output format name -> base file name; ``ProposalWriter`` adds ``-<checkpoint stem>`` (and
``.<n>``, ``n >= 2``, for a later predict of that checkpoint: the repeat number all of that predict's
outputs take) before the suffix: :func:`~lightning_rpn.training.proposal_writer.proposal_paths`."""

_LOGIT_EPS = 1e-12


def _numpy(value: Any, dtype: type, shape_tail: tuple[int, ...], what: str) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.size == 0:
        array = array.reshape((0, *shape_tail))
    if array.shape[1:] != shape_tail:
        raise ValueError(f"{what}: expected shape [P{''.join(f', {n}' for n in shape_tail)}], got {array.shape}")
    return array.astype(dtype)


def _json_id(image_id: Any) -> int | str:
    """A JSON-safe image id (numpy / tensor scalars become Python ints)."""
    if isinstance(image_id, Tensor):
        image_id = image_id.item()
    if isinstance(image_id, np.generic):
        image_id = image_id.item()
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
        raise TypeError(f"proposal image_id must be an int or a str, got {type(image_id).__name__} {image_id!r}")
    return image_id


def proposal_records(
    proposals: Iterable[Mapping[str, Any]], where: str
) -> Iterable[tuple[int | str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """``(image_id, boxes [P, 4], scores [P], logits [P] or None)`` float32 per record, checked."""
    for index, item in enumerate(proposals):
        missing = {"image_id", "boxes", "scores"} - set(item)
        if missing:
            raise ValueError(f"{where}: proposal record {index} lacks {sorted(missing)}")
        image_id = _json_id(item["image_id"])
        boxes = _numpy(item["boxes"], np.float32, (4,), f"{where}: boxes of image {image_id!r}")
        scores = _numpy(item["scores"], np.float32, (), f"{where}: scores of image {image_id!r}")
        if len(boxes) != len(scores):
            raise ValueError(
                f"{where}: image {image_id!r} has {len(boxes)} boxes but {len(scores)} scores"
            )
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):  # a file no reader could use
            raise ValueError(f"{where}: image {image_id!r} has non-finite boxes or scores (NaN or infinite: the "
                             "weights have most likely diverged)")
        logits = None
        if item.get("objectness_logits") is not None:
            logits = _numpy(item["objectness_logits"], np.float32, (), f"{where}: objectness_logits of image {image_id!r}")
            if len(logits) != len(scores):
                raise ValueError(
                    f"{where}: image {image_id!r} has {len(scores)} scores but {len(logits)} objectness_logits"
                )
        yield image_id, boxes, scores, logits


_TEMPORARY = re.compile(
    r"\.(?:" + "|".join(rf"{re.escape(Path(f).stem)}-.+{re.escape(Path(f).suffix)}" for f in FORMATS.values())
    + r")\.tmp(?P<pid>[1-9][0-9]*)"
)
"""A temporary proposal file's name: ``.proposals_coco-<stem>.json.tmp<pid>`` or the detectron2 one."""


def _running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one of another user counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary proposal files in ``folder`` that a killed write left; the removed paths.

    Only names of exactly the form :func:`~lightning_rpn._files.atomic_write` gives a proposal file
    (``.proposals_coco-<stem>.json.tmp<pid>``, ``.proposals_detectron2-<stem>.pkl.tmp<pid>``) whose
    process no longer runs: another write in progress on this machine, and every other file,
    stay. (A write in progress on another machine sharing the folder cannot be told apart.)
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY.fullmatch(path.name)
        if match and path.is_file() and not path.is_symlink() and not _running(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_coco_proposals(
    path: str | Path, proposals: Iterable[Mapping[str, Any]], category_id: int = 1, decimals: int | None = 2
) -> Path:
    """Write proposal records as a class-agnostic COCO results JSON (``bbox`` xywh); streamed.

    ``category_id`` goes on every result: a category of the annotation file they will be
    evaluated against (pycocotools drops the others, even with ``useCats = 0``). ``bbox`` is
    rounded to ``decimals``; each score is written as the shortest decimal that reads back to the
    same float32 (at most 9 significant digits, not a float64's 17: 8% of a file of 1000
    proposals an image).
    """
    path = Path(path)
    with atomic_write(path, "w") as handle:
        handle.write("[")
        first = True
        for image_id, boxes, scores, _ in proposal_records(proposals, f"write_coco_proposals({str(path)!r})"):
            xywh = boxes.astype(np.float64)
            xywh[:, 2:] -= xywh[:, :2]
            if decimals is not None:
                xywh = xywh.round(decimals)
            for bbox, score in zip(xywh.tolist(), map(_shortest_float32, scores.astype(np.float32))):
                entry = {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}
                handle.write(("" if first else ",\n") + json.dumps(entry))
                first = False
        handle.write("]\n")
    return path


def _shortest_float32(value: np.float32) -> float:
    """The float whose repr is the shortest decimal that reads back to ``value`` as a float32."""
    return float(str(value))


def _sorted_record(image_id: int | str, boxes: np.ndarray, scores: np.ndarray, **extra: Any) -> dict[str, Any]:
    """A record of tensors, best first (by ``objectness_logits`` when given, else by score)."""
    order = np.argsort(-extra.get("objectness_logits", scores), kind="stable")
    out = {"image_id": image_id, "boxes": torch.from_numpy(boxes[order]), "scores": torch.from_numpy(scores[order])}
    out.update({k: torch.from_numpy(v[order]) for k, v in extra.items()})
    return out


def read_coco_proposals(path: str | Path) -> list[dict[str, Any]]:
    """Proposal records (xyxy float32 tensors, best first) from a COCO results JSON.

    One record per image id, in order of first appearance; ``category_id`` is ignored. An entry
    whose ``bbox`` is not 4 finite numbers or whose ``score`` is not a finite number is a
    ``ValueError`` naming it (a ``null`` would read as NaN, and a bbox of 3 numbers would shift
    every box after it).
    """
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        entries = json.load(handle)
    if not isinstance(entries, list):
        raise ValueError(f"read_coco_proposals: {str(path)!r} holds a {type(entries).__name__}, expected a results list")
    groups: dict[int | str, tuple[list, list]] = {}
    for index, entry in enumerate(entries):
        try:
            boxes, scores = groups.setdefault(entry["image_id"], ([], []))
            boxes.append(entry["bbox"])
            scores.append(entry["score"])
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"read_coco_proposals: entry {index} of {str(path)!r} is not a COCO result "
                f"(image_id, bbox, score): {entry!r}"
            ) from error
    records = []
    for image_id, (boxes, scores) in groups.items():
        try:  # each image's numbers checked at once; the entry at fault is looked for only when they fail
            xyxy, probabilities = np.array(boxes, dtype=np.float64), np.array(scores, dtype=np.float64)
            usable = xyxy.shape == (len(boxes), 4) and probabilities.shape == (len(scores),) \
                and bool(np.isfinite(xyxy).all() and np.isfinite(probabilities).all())
        except (TypeError, ValueError, OverflowError):  # a ragged list, a string that is no number, an object
            usable = False
        if not usable:
            raise _bad_entry(path, entries)
        xyxy[:, 2:] += xyxy[:, :2]
        records.append(_sorted_record(image_id, xyxy.astype(np.float32), probabilities.astype(np.float32)))
    return records


def _bad_entry(path: Path, entries: list[Any]) -> ValueError:
    """The error naming the first of ``entries`` whose bbox is not 4 finite numbers or whose score
    is not a finite number (``null`` reads as NaN; a bbox of 3 numbers would shift every later box)."""
    for index, entry in enumerate(entries):
        if not (isinstance(entry["bbox"], list) and len(entry["bbox"]) == 4
                and all(map(_finite_number, entry["bbox"])) and _finite_number(entry["score"])):
            return ValueError(f"read_coco_proposals: entry {index} of {str(path)!r} (image {entry['image_id']!r}) "
                              f"needs a bbox of 4 finite numbers (x, y, w, h) and a finite score: {entry!r}")
    return ValueError(f"read_coco_proposals: {str(path)!r} holds a bbox or score that is not a number")


def _finite_number(value: Any) -> bool:
    """Whether ``value`` (read from JSON) converts to a finite number, as numpy converts it (a number,
    or a string of one; ``null``, ``NaN`` and integers past float64 do not)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def write_detectron2_proposals(path: str | Path, proposals: Iterable[Mapping[str, Any]]) -> Path:
    """Write proposal records as detectron2's precomputed-proposals pickle.

    The logits are each record's ``objectness_logits``, or ``logit(score)`` for a record
    without them (lossy where float32 probabilities saturate). The file is one pickled dict of
    lists, so every image's boxes and logits (the file's content, which detectron2 loads whole
    too) are in memory while it is written; the records themselves are read one at a time.
    """
    path = Path(path)
    ids, all_boxes, all_logits = [], [], []
    for image_id, boxes, scores, logits in proposal_records(proposals, f"write_detectron2_proposals({str(path)!r})"):
        if logits is None:
            p = np.clip(scores.astype(np.float64), _LOGIT_EPS, 1.0 - _LOGIT_EPS)
            logits = (np.log(p) - np.log1p(-p)).astype(np.float32)
        ids.append(image_id)
        all_boxes.append(boxes)
        all_logits.append(logits)
    payload = {"ids": ids, "boxes": all_boxes, "objectness_logits": all_logits, "bbox_mode": 0}
    with atomic_write(path, "wb") as handle:
        pickle.dump(payload, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def read_detectron2_proposals(path: str | Path) -> list[dict[str, Any]]:
    """Proposal records from a detectron2 proposals pickle; ``scores = sigmoid(logits)``.

    Records also carry ``"objectness_logits"``. Only ``bbox_mode`` 0 (XYXY_ABS) is accepted.
    """
    path = Path(path)
    with path.open("rb") as handle:
        payload = pickle.load(handle)
    if not isinstance(payload, dict) or not {"ids", "boxes", "objectness_logits"} <= set(payload):
        raise ValueError(
            f"read_detectron2_proposals: {str(path)!r} is not a detectron2 proposals file "
            f"(a dict with ids, boxes, objectness_logits)"
        )
    mode = int(payload.get("bbox_mode", 0))
    if mode != 0:
        raise ValueError(f"read_detectron2_proposals: {str(path)!r} has bbox_mode {mode}; only 0 (XYXY_ABS) is read")
    if not len(payload["ids"]) == len(payload["boxes"]) == len(payload["objectness_logits"]):
        raise ValueError(
            f"read_detectron2_proposals: {str(path)!r} has {len(payload['ids'])} ids, "
            f"{len(payload['boxes'])} box arrays and {len(payload['objectness_logits'])} logit arrays"
        )
    records = []
    for image_id, boxes, logits in zip(payload["ids"], payload["boxes"], payload["objectness_logits"]):
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        scores = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
        records.append(_sorted_record(image_id, boxes, scores, objectness_logits=logits))
    return records


def _part_entries(path: Path) -> Iterator[tuple[int | None, int | str, int]]:
    """``(dataset_index, image_id, byte offset)`` of each record of a part file, one record in memory at a time."""
    with path.open("rb") as handle:
        while True:
            offset = handle.tell()
            try:
                index, image_id, *_ = pickle.load(handle)
            except EOFError:
                return
            yield index, image_id, offset


class MergedParts(Sequence[dict[str, Any]]):
    """The records of per-rank part files in merged order, read from the files when used.

    Holds only where each kept record lies (part and byte offset), a few numbers per image, so a
    whole dataset's proposals are never in memory at once: iterating reads one record at a time
    (each part file opened once), indexing reads the one record asked for. Built by
    :func:`merge_proposal_parts`; valid while the part files exist.
    """

    def __init__(self, paths: Sequence[Path], entries: Sequence[tuple[int, int]]) -> None:
        self._paths = list(paths)
        self._entries = list(entries)  # (part number, byte offset) per record, in merged order

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _record(handle: IO[bytes], offset: int) -> dict[str, Any]:
        handle.seek(offset)
        _, image_id, boxes, scores, logits = pickle.load(handle)
        return {"image_id": image_id, "boxes": boxes, "scores": scores, "objectness_logits": logits}

    def __getitem__(self, position: int | slice) -> Any:
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        part, offset = self._entries[position]
        with self._paths[part].open("rb") as handle:
            return self._record(handle, offset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        handles: dict[int, IO[bytes]] = {}
        try:
            for part, offset in self._entries:
                if part not in handles:
                    handles[part] = self._paths[part].open("rb")
                yield self._record(handles[part], offset)
        finally:
            for handle in handles.values():
                handle.close()


def merge_proposal_parts(paths: Sequence[str | Path]) -> MergedParts:
    """Records of per-rank part files, deduplicated by image id, in dataset order when known.

    A part file is a sequence of pickled ``(dataset_index | None, image_id, boxes, scores,
    logits | None)`` tuples (what ``ProposalWriter`` appends per image). Duplicates (the padding a
    distributed sampler adds) keep their first copy; records without an index follow the
    indexed ones in rank order. The records are read once here for their ids and again, one at a
    time, when the result is used (:class:`MergedParts`): memory holds a few numbers per image,
    not the proposals.
    """
    paths = [Path(path) for path in paths]
    seen: dict[int | str, tuple[float, int, int, int]] = {}
    arrival = 0
    for part, path in enumerate(paths):
        for index, image_id, offset in _part_entries(path):
            if image_id not in seen:
                seen[image_id] = (float(index) if index is not None else math.inf, arrival, part, offset)
            arrival += 1
    return MergedParts(paths, [(part, offset) for _, _, part, offset in sorted(seen.values())])
