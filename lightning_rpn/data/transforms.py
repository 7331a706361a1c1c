"""Augmentation pipelines declared in YAML, and the resize policy.

Transform spec format (what configs and YAML files hold): a list with one single-key mapping
per albumentations transform, the key being the class name and the value its keyword
arguments; containers (``OneOf``, ``SomeOf``, ``Sequential``) take their children as a spec
list under ``transforms``::

    train_transforms:
      - HorizontalFlip: {p: 0.5}
      - OneOf:
          transforms:
            - RandomBrightnessContrast: {p: 1.0}
            - HueSaturationValue: {p: 1.0}
          p: 0.5

:func:`build_transform` wraps the spec in ``A.Compose`` with
``BboxParams(format="pascal_voc", clip=True, min_visibility=...)``; :func:`transform_to_spec`
turns a built pipeline back into a spec (every argument explicit, YAML-safe), so
``build -> to_spec -> YAML -> build`` gives the same pipeline. The resize policy is applied
after the augmentations, by :class:`DetectionTransform`, in one interpolation step.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
import yaml

from lightning_rpn.data.problems import DataError
from lightning_rpn.data.sample import DetectionSample

__all__ = [
    "TransformSpec",
    "ResizePolicy",
    "build_transform",
    "transform_to_spec",
    "load_transform_spec",
    "dump_transform_spec",
    "DetectionTransform",
    "TransformedDataset",
]

TransformSpec = list[dict[str, Any]]

_BOX_FIELD = "box_kind"  # 0: ground truth, 1: crowd
_CONTAINERS = {"OneOf", "SomeOf", "Sequential", "OneOrOther", "SelectiveChannelTransform"}


def _build_one(entry: Any, where: str) -> A.BasicTransform | A.BaseCompose:
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ValueError(
            f"{where}: expected a single-key mapping like {{'HorizontalFlip': {{'p': 0.5}}}}, got {entry!r}"
        )
    (name, kwargs), = entry.items()
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ValueError(f"{where}: arguments of {name!r} must be a mapping like {{'p': 0.5}}, got {kwargs!r}")
    kwargs = {} if kwargs is None else dict(kwargs)
    cls = getattr(A, str(name), None)
    if not isinstance(cls, type) or not issubclass(cls, (A.BasicTransform, A.BaseCompose)):
        raise ValueError(f"{where}: {name!r} is not an albumentations transform (albumentations {A.__version__})")
    if name == "Compose":
        raise ValueError(f"{where}: 'Compose' is added by the pipeline; list its transforms directly")
    if name in _CONTAINERS and "transforms" in kwargs:
        kwargs["transforms"] = _build_list(kwargs["transforms"], f"{where}.{name}.transforms")
    # albumentations drops an argument it does not know (a typo, a 1.x name; 2.0.8 warns, 2.0.0
    # says nothing) and builds the transform with its default: what the config asked would not run
    parameters = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        unknown = [key for key in kwargs if key not in parameters or key == "self"]
        if unknown:
            known = ", ".join(key for key in parameters if key != "self")
            raise ValueError(f"{where}: {name} has no argument(s) {', '.join(map(repr, unknown))} "
                             f"(albumentations {A.__version__}: {known})")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: cannot build {name}(**{kwargs!r}): {error}") from error


def _build_list(spec: Any, where: str) -> list:
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"{where}: expected a list of transforms, got {type(spec).__name__} {spec!r}")
    return [_build_one(entry, f"{where}[{i}]") for i, entry in enumerate(spec)]


def build_transform(
    spec: TransformSpec | None, min_visibility: float = 0.0, where: str = "transforms"
) -> A.Compose:
    """``A.Compose`` of ``spec`` with pascal_voc boxes, clipping, and ``min_visibility``."""
    if not 0.0 <= min_visibility <= 1.0:
        raise ValueError(f"{where}: min_visibility={min_visibility} must be in [0, 1]")
    transforms = _build_list(spec or [], where)
    with warnings.catch_warnings():
        # an empty pipeline is valid here (evaluation without augmentation)
        warnings.filterwarnings("ignore", message="Got processor for bboxes, but no transform")
        return A.Compose(
            transforms,
            bbox_params=A.BboxParams(
                format="pascal_voc", label_fields=[_BOX_FIELD], clip=True, min_visibility=min_visibility
            ),
        )


def _yaml_safe(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _entry_to_spec(serialized: dict[str, Any]) -> dict[str, Any]:
    args = {k: v for k, v in serialized.items() if k != "__class_fullname__"}
    name = serialized["__class_fullname__"].rsplit(".", 1)[-1]
    if "transforms" in args:
        args["transforms"] = [_entry_to_spec(child) for child in args["transforms"]]
    return {name: _yaml_safe(args)}


def transform_to_spec(transform: A.BaseCompose) -> TransformSpec:
    """The spec list of a pipeline built by :func:`build_transform` (all arguments explicit)."""
    serialized = A.to_dict(transform)["transform"]
    return [_entry_to_spec(child) for child in serialized["transforms"]]


def load_transform_spec(text_or_path: str | os.PathLike[str]) -> TransformSpec:
    """A spec list from YAML text or a YAML file."""
    text = str(text_or_path)
    if isinstance(text_or_path, os.PathLike) or (os.path.isfile(text) and "\n" not in text):
        with open(text_or_path, encoding="utf-8") as handle:
            text = handle.read()
    spec = yaml.safe_load(text)
    _build_list(spec if spec is not None else [], f"YAML {str(text_or_path)[:60]!r}")
    return spec if spec is not None else []


def dump_transform_spec(spec: TransformSpec) -> str:
    """YAML text of a spec list (:func:`load_transform_spec` reads it back)."""
    return yaml.safe_dump(_yaml_safe(spec), sort_keys=False)


@dataclass(frozen=True)
class ResizePolicy:
    """How images are resized after augmentation.

    ``"none"`` keeps the size; ``"shortest_edge"`` scales the shorter side to one of
    ``min_sizes`` (training picks one at random per image, evaluation uses the last) unless
    the longer side would then exceed ``max_size``, in which case the longer side becomes
    ``max_size``; ``"fixed"`` resizes to ``fixed_size = (h, w)`` (aspect ratio not kept).
    """

    mode: Literal["none", "shortest_edge", "fixed"] = "none"
    min_sizes: tuple[int, ...] = (800,)
    max_size: int = 1333
    fixed_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("none", "shortest_edge", "fixed"):
            raise ValueError(f"resize: mode={self.mode!r} is not one of 'none', 'shortest_edge', 'fixed'")
        object.__setattr__(self, "min_sizes", tuple(int(s) for s in self.min_sizes))
        if self.mode == "shortest_edge" and (not self.min_sizes or min(self.min_sizes) <= 0 or self.max_size <= 0):
            raise ValueError(
                f"resize: shortest_edge needs positive min_sizes and max_size, got {self.min_sizes}, {self.max_size}"
            )
        if self.mode == "fixed":
            if self.fixed_size is None or len(self.fixed_size) != 2 or min(self.fixed_size) <= 0:
                raise ValueError(f"resize: mode='fixed' needs fixed_size=(h, w) > 0, got {self.fixed_size!r}")
            object.__setattr__(self, "fixed_size", (int(self.fixed_size[0]), int(self.fixed_size[1])))

    def target_size(self, size: tuple[int, int], train: bool) -> tuple[int, int]:
        """The ``(h, w)`` an image of ``size`` is resized to (random choice when ``train``)."""
        height, width = size
        if self.mode == "none":
            return size
        if self.mode == "fixed":
            assert self.fixed_size is not None
            return self.fixed_size
        if train and len(self.min_sizes) > 1:
            short = self.min_sizes[int(torch.randint(len(self.min_sizes), (1,)))]
        else:
            short = self.min_sizes[-1]
        scale = min(short / min(height, width), self.max_size / max(height, width))
        return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


class DetectionTransform:
    """Augment (albumentations) then resize a :class:`DetectionSample`, counting removed boxes.

    Picklable. The albumentations random state is re-seeded once per process from torch's
    seed (in a DataLoader worker, the worker's seed), so workers draw different augmentations
    and ``seed_everything`` makes runs repeatable.
    """

    def __init__(
        self,
        spec: TransformSpec | None = None,
        min_visibility: float = 0.0,
        resize: ResizePolicy | None = None,
        train: bool = False,
    ) -> None:
        self.spec: TransformSpec = list(spec or [])
        self.min_visibility = min_visibility
        self.resize = resize or ResizePolicy()
        self.train = train
        self.compose = build_transform(self.spec, min_visibility, "train_transforms" if train else "val_transforms")
        self._seeded_pid: int | None = None

    def _seed_for_process(self) -> None:
        if self._seeded_pid != os.getpid():
            worker = torch.utils.data.get_worker_info()
            seed = worker.seed if worker is not None else torch.initial_seed()
            self.compose.set_random_seed(int(seed) % 2**32)
            self._seeded_pid = os.getpid()

    def _pipeline_error(self, sample: DetectionSample, error: Exception) -> DataError:
        """A :class:`DataError` naming the image, its size and the setting of a pipeline that failed on it."""
        height, width = sample.image_size
        setting = "data.train_transforms" if self.train else "data.val_transforms"
        message = f"{setting} failed on this {width}x{height} (w x h) image: {type(error).__name__}: {error}"
        if type(error).__name__ == "CropSizeError":  # albumentations' own class, not exported at the top
            message += ("; the crop does not fit the image: put PadIfNeeded (min_height, min_width at least "
                        "the crop size) before the crop, use a smaller crop, or (large images) train on "
                        "windows with data.tiles instead of cropping")
        return DataError(message, file=sample.source, image_id=sample.image_id)

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        image, boxes, crowd = sample.image, sample.boxes, sample.crowd_boxes
        removed = 0
        if self.spec:
            self._seed_for_process()
            all_boxes = np.concatenate([boxes, crowd]) if len(crowd) else boxes
            kinds = [0] * len(boxes) + [1] * len(crowd)
            try:
                out = self.compose(image=image, bboxes=all_boxes, **{_BOX_FIELD: kinds})
            except Exception as error:  # an albumentations error names neither the image nor the setting
                raise self._pipeline_error(sample, error) from error
            image = out["image"]
            kept = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            kept_kinds = np.asarray(out[_BOX_FIELD], dtype=np.int64).reshape(-1)
            boxes, crowd = kept[kept_kinds == 0], kept[kept_kinds == 1]
            removed = len(sample.boxes) - len(boxes)
        size = (int(image.shape[0]), int(image.shape[1]))
        new_size = self.resize.target_size(size, self.train)
        if new_size != size:
            image = cv2.resize(image, (new_size[1], new_size[0]), interpolation=cv2.INTER_LINEAR)
            scale = np.array([new_size[1] / size[1], new_size[0] / size[0]] * 2, dtype=np.float32)
            boxes, crowd = boxes * scale, crowd * scale
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        removed += int((~valid).sum())
        return replace(
            sample,
            image=np.ascontiguousarray(image),
            boxes=boxes[valid],
            crowd_boxes=crowd[(crowd[:, 2] > crowd[:, 0]) & (crowd[:, 3] > crowd[:, 1])],
            removed_boxes=sample.removed_boxes + removed,
        )



class TransformedDataset(torch.utils.data.Dataset):
    """``dataset`` with ``transform`` applied to every item (a picklable wrapper)."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform: DetectionTransform | None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> DetectionSample:
        sample = self.dataset[index]
        if self.transform is not None:
            sample = self.transform(sample)
        sample.dataset_index = int(index)
        return sample
