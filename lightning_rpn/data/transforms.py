"""Augmentation pipelines declared in YAML, and the resize policy.

Transform spec format (what configs and YAML files hold): a list with one single-key mapping
per albumentations transform, the key being the class name and the value its keyword
arguments; containers (``OneOf``, ``SomeOf``, ``Sequential``, ``RandomOrder``,
``SelectiveChannelTransform``) take their children as a spec list under ``transforms``, and
``OneOrOther`` takes one entry each under ``first`` and ``second``::

    train_transforms:
      - HorizontalFlip: {p: 0.5}
      - OneOf:
          transforms:
            - RandomBrightnessContrast: {p: 1.0}
            - HueSaturationValue: {p: 1.0}
          p: 0.5

:func:`build_transform` wraps the spec in ``A.Compose`` with
``BboxParams(format="pascal_voc", clip=True, min_visibility=...)`` and refuses, when it is
built, what cannot run here (:class:`TransformSpecError`): transforms that change the image's
format (pipelines return ``H x W x 3`` uint8; the model normalises), transforms needing inputs
other than the image and its boxes, and, for evaluation (``pixel_only``), any transform that
moves pixels or boxes. Boxes follow the package's rules (:class:`_BoxRules`): clipped after
every transform; a ground-truth box is kept while the share of its area before all transforms
that is still in the image is at least ``min_visibility`` (the shares of successive transforms
multiply); a crowd box while any part of it is in the image, as in ``data.tiles`` windows.
:func:`transform_to_spec` turns a built pipeline back into a spec (every argument explicit,
YAML-safe), so ``build -> to_spec -> YAML -> build`` gives the same pipeline. The resize policy
is applied after the augmentations, by :class:`DetectionTransform`, in one interpolation step;
evaluation and predict size images by it alone, so a training pipeline holding a transform that
resizes to a size of its own (:data:`SIZE_SETTING_TRANSFORMS`) under resize mode ``none`` is warned about.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
import yaml
from albumentations.core.bbox_utils import BboxProcessor, calculate_bbox_areas_in_pixels, clip_bboxes

from lightning_rpn.core.config import SettingError
from lightning_rpn.data.draws import item_seed, seed_pipeline
from lightning_rpn.data.problems import DataError
from lightning_rpn.data.sample import DetectionSample

__all__ = [
    "TransformSpec",
    "TransformSpecError",
    "SIZE_SETTING_TRANSFORMS",
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
_VISIBLE_FIELD = "box_visible"  # share of the box's area before the transforms still in the image
_ORIGIN_FIELD = "box_origin"  # the box's row in the input: fragments of one box (RandomGridShuffle) share it
_GROUND_TRUTH, _CROWD = 0, 1
_OUTPUT_FORMAT = {"Normalize", "ToFloat", "FromFloat", "ToTensorV2"}
"""Transforms that turn the ``H x W x 3`` uint8 image into another format (float, a tensor)."""
_SUPPLIED = {"image", "bboxes"}
"""What the pipeline is called with (besides the boxes' label fields)."""
_AREA_EPSILON = 1e-7  # albumentations' own, in its visibility ratio: one cut keeps the boxes it keeps
SIZE_SETTING_TRANSFORMS = frozenset({
    "Resize", "LongestMaxSize", "SmallestMaxSize", "RandomResizedCrop", "RandomSizedCrop", "RandomSizedBBoxSafeCrop",
})
"""Transforms that scale the image to a size given in their arguments, whatever the image's own size.
A training pipeline holding one trains at that scale while evaluation and predict size images by the
resize policy alone, so :class:`DetectionTransform` warns when that policy is ``none``. Crops and pads
(``RandomCrop``, ``PadIfNeeded``) keep the objects' scale, and ``RandomScale`` / ``Affine`` scale by a
random factor around the image's own size: none of them is listed."""


class TransformSpecError(SettingError):
    """A transform spec that cannot be built or cannot run here; the message names the entry
    (``data.train_transforms[1]``) and says what to do."""


def _format_problem(transform: A.BasicTransform) -> str | None:
    """Why ``transform`` would return something other than an ``H x W x 3`` uint8 image, if it would."""
    name = type(transform).__name__
    channels = getattr(transform, "num_output_channels", 3)
    if name not in _OUTPUT_FORMAT and channels == 3:
        return None
    made = f"{channels}-channel images" if channels != 3 else "float images or tensors"
    return (f"{name} makes {made}, but the pipeline must return H x W x 3 uint8 images: leave it out "
            "(the model normalises images itself, with the ImageNet mean and std, and the collate makes the tensors)")


def _input_problem(transform: A.BasicTransform) -> str | None:
    """Why ``transform`` cannot run on an image and its boxes alone (albumentations' declared needs), if it cannot."""
    name = type(transform).__name__
    if "image" not in transform.targets:
        return f"{name} works on {', '.join(sorted(transform.targets))}, not on images: leave it out"
    needed = sorted(set(transform.targets_as_params) - _SUPPLIED)
    if needed:
        return (f"{name} needs {', '.join(needed)} besides the image, which this pipeline never supplies "
                "(it gets one image and its boxes): leave it out")
    return None


def _pixel_problem(transform: A.BasicTransform) -> str | None:
    """Why ``transform`` has no place in an evaluation pipeline (it moves pixels or boxes), if it has none."""
    if not isinstance(transform, A.DualTransform):
        return None
    return (f"{type(transform).__name__} moves pixels or changes boxes (an albumentations DualTransform), but "
            "evaluation transforms may only change pixel values: predict maps proposals back to the original "
            "image by the resize alone. Resize with data.resize (min_sizes, max_size, fixed_size); for large "
            "images, evaluate on windows with model.sliding_window (data.tiles trains on windows)")


def _check_usable(transform: A.BasicTransform, where: str, pixel_only: bool) -> None:
    """Refuse ``transform`` (a :class:`TransformSpecError` naming ``where``) when it cannot run here."""
    for problem in (_format_problem(transform), _input_problem(transform),
                    _pixel_problem(transform) if pixel_only else None):
        if problem is not None:
            raise TransformSpecError(f"{where}: {problem}")


def _check_arguments(parameters: Mapping[str, inspect.Parameter], name: str, kwargs: dict[str, Any],
                     where: str) -> None:
    """albumentations drops an argument it does not know (a typo, a 1.x name; 2.0.8 warns, 2.0.0
    says nothing) and builds the transform with its default: what the config asked would not run.
    ``parameters``: those of the transform's ``__init__``."""
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = [key for key in kwargs if key not in parameters or key == "self"]
    if unknown:
        known = ", ".join(key for key in parameters if key != "self")
        raise TransformSpecError(f"{where}: {name} has no argument(s) {', '.join(map(repr, unknown))} "
                                 f"(albumentations {A.__version__}: {known})")


def _build_children(cls: type, parameters: Mapping[str, inspect.Parameter], kwargs: dict[str, Any], where: str,
                    pixel_only: bool) -> dict[str, Any]:
    """A container's arguments with its children built: the spec list under ``transforms`` and
    each single entry under an argument declared as a transform (``OneOrOther``'s ``first``, ``second``)."""
    built = dict(kwargs)
    for key, value in kwargs.items():
        declared = str(parameters[key].annotation) if key in parameters else ""
        if key == "transforms":
            built[key] = _build_list(value, f"{where}.{cls.__name__}.transforms", pixel_only)
        elif isinstance(value, Mapping) and "Transform" in declared:
            built[key] = _build_one(value, f"{where}.{cls.__name__}.{key}", pixel_only)
    return built


def _object_problem(value: Any) -> str | None:
    """Why ``value``, an albumentations object, is not a spec (specs are data), if it is one."""
    if not isinstance(value, (A.BasicTransform, A.BaseCompose)):
        return None
    return (f"got an albumentations {type(value).__name__} object, but transform specs are data (YAML-like): "
            "a list of single-key mappings such as [{'HorizontalFlip': {'p': 0.5}}]. Convert a pipeline, a "
            "transform or a list of them with lightning_rpn.data.transforms.transform_to_spec(obj)")


def _build_one(entry: Any, where: str, pixel_only: bool = False) -> A.BasicTransform | A.BaseCompose:
    problem = _object_problem(entry)
    if problem is not None:
        raise TransformSpecError(f"{where}: {problem}")
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise TransformSpecError(
            f"{where}: expected a single-key mapping like {{'HorizontalFlip': {{'p': 0.5}}}}, got {entry!r}"
        )
    (name, kwargs), = entry.items()
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TransformSpecError(f"{where}: arguments of {name!r} must be a mapping like {{'p': 0.5}}, got {kwargs!r}")
    kwargs = {} if kwargs is None else dict(kwargs)
    cls = getattr(A, str(name), None)
    if not isinstance(cls, type) or not issubclass(cls, (A.BasicTransform, A.BaseCompose)):
        raise TransformSpecError(
            f"{where}: {name!r} is not an albumentations transform (albumentations {A.__version__})")
    if issubclass(cls, A.Compose):  # ReplayCompose too: its own boxes processing and replay have no use here
        raise TransformSpecError(f"{where}: {name!r} is a whole pipeline, and the pipeline's own Compose is added "
                                 "for you: list its transforms directly (group them with Sequential)")
    parameters = inspect.signature(cls.__init__).parameters
    if issubclass(cls, A.BaseCompose):
        kwargs = _build_children(cls, parameters, kwargs, where, pixel_only)
    _check_arguments(parameters, str(name), kwargs, where)
    try:
        transform = cls(**kwargs)
    except Exception as error:  # albumentations raises ValueError, TypeError, AttributeError, pydantic's errors
        raise TransformSpecError(f"{where}: cannot build {name}(**{kwargs!r}): {type(error).__name__}: {error}") \
            from error
    if isinstance(transform, A.BasicTransform):
        _check_usable(transform, where, pixel_only)
    return transform


def _build_list(spec: Any, where: str, pixel_only: bool = False) -> list:
    problem = _object_problem(spec)
    if problem is not None:
        raise TransformSpecError(f"{where}: {problem}")
    if isinstance(spec, Mapping):
        as_list = [{name: kwargs} for name, kwargs in spec.items()]
        raise TransformSpecError(f"{where}: expected a list of single-key mappings, one per transform, got a "
                                 f"mapping: write {as_list!r} (in YAML, one '- Name: {{...}}' line per transform)")
    if not isinstance(spec, (list, tuple)):
        raise TransformSpecError(f"{where}: expected a list of transforms, got {type(spec).__name__} {spec!r}")
    return [_build_one(entry, f"{where}[{i}]", pixel_only) for i, entry in enumerate(spec)]


class _BoxRules(BboxProcessor):
    """albumentations' box processor with the package's rules, applied after every transform.

    Rows are albumentations boxes (normalised ``x1, y1, x2, y2``) followed by the label columns
    ``box_kind`` and ``box_visible``. Each box is clipped to the image (albumentations' own
    clipping and areas). A box the clipping cut has its visible share multiplied by the part
    the cut kept, so the share stays measured against the box before all transforms (two crops
    keeping 55 % each leave 30 %); a cut ground-truth box is dropped when its share falls under
    ``min_visibility`` (a single cut keeps exactly the boxes albumentations' own check keeps), a
    crowd box only when nothing of it is left. Clipping after each transform also means a box a
    crop removed does not come back over padding or a rotation's corners.
    """

    def filter(self, data: np.ndarray, shape: Any) -> np.ndarray:
        if not len(data):
            return data
        labels = list(self.params.label_fields)
        first_label = data.shape[1] - len(labels)
        kind, visible = first_label + labels.index(_BOX_FIELD), first_label + labels.index(_VISIBLE_FIELD)
        clipped = clip_bboxes(data, shape)
        area, inside = calculate_bbox_areas_in_pixels(data, shape), calculate_bbox_areas_in_pixels(clipped, shape)
        cut = ((data[:, :4] < 0) | (data[:, :4] > 1)).any(axis=1)
        share = np.where(cut, data[:, visible] * inside / (area + _AREA_EPSILON), data[:, visible])
        clipped[:, visible] = share
        too_little = cut & (data[:, kind] == _GROUND_TRUTH) & (share < self.params.min_visibility)
        return clipped[(inside > 0) & ~too_little]


def build_transform(
    spec: TransformSpec | None, min_visibility: float = 0.0, where: str = "transforms", pixel_only: bool = False
) -> A.Compose:
    """``A.Compose`` of ``spec`` with pascal_voc boxes, clipping, ``min_visibility`` and the box rules.

    Called as ``compose(image=..., bboxes=..., box_kind=[0 ground truth | 1 crowd, ...],
    box_visible=[1.0, ...], box_origin=[0, 1, ...])`` (each box's row: the fragments of a split box
    share it; :class:`DetectionTransform` does). ``pixel_only`` (evaluation) refuses transforms that
    move pixels or boxes. Errors are :class:`TransformSpecError` naming
    the entry under ``where`` (``data.train_transforms``).
    """
    if not 0.0 <= min_visibility <= 1.0:
        raise TransformSpecError(f"{where}: min_visibility={min_visibility} must be in [0, 1]")
    transforms = _build_list([] if spec is None else spec, where, pixel_only)
    with warnings.catch_warnings():
        # an empty pipeline is valid here (evaluation without augmentation)
        warnings.filterwarnings("ignore", message="Got processor for bboxes, but no transform")
        compose = A.Compose(
            transforms,
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=[_BOX_FIELD, _VISIBLE_FIELD, _ORIGIN_FIELD],
                                     clip=True, min_visibility=min_visibility, check_each_transform=True),
        )
    # albumentations builds its box processor itself (no hook for another): the package's rules go to
    # that one object, which the pipeline and every container in it check the boxes with
    compose.processors["bboxes"].__class__ = _BoxRules
    return compose


def _yaml_safe(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def _unserialized_arguments(container: A.BaseCompose, serialized: dict[str, Any]) -> dict[str, Any]:
    """A container's arguments that albumentations' ``to_dict`` leaves out (``SelectiveChannelTransform``'s
    ``channels``), read from the container; its children are under ``transforms`` already."""
    parameters = inspect.signature(type(container).__init__).parameters
    return {key: getattr(container, key) for key, parameter in parameters.items()
            if key != "self" and key not in serialized and "Transform" not in str(parameter.annotation)
            and hasattr(container, key)}


def _own_arguments(name: str, args: dict[str, Any], transform: A.BasicTransform) -> dict[str, Any]:
    """``args`` (albumentations' ``to_dict``) less what the class's ``__init__`` does not take.

    ``to_dict`` also writes attributes a parent class sets (``PadIfNeeded``'s ``padding``, from
    ``Pad``; ``SafeRotate``'s ``rotate``, from ``Affine``), which building the spec again refuses.
    ``__init__`` derives them from its own arguments: they are dropped when the transform built
    from those arguments has the same values, refused otherwise (set on the object afterwards, a
    spec cannot hold them)."""
    parameters = inspect.signature(type(transform).__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return args
    own = {key: value for key, value in args.items() if key in parameters}
    if len(own) == len(args):
        return own
    with warnings.catch_warnings():  # a rebuild for the comparison: its warnings are no news to the user
        warnings.simplefilter("ignore")
        derived = A.to_dict(type(transform)(**own))["transform"]
    changed = sorted(key for key in args.keys() - own.keys()
                     if _yaml_safe(derived.get(key)) != _yaml_safe(args[key]))
    if changed:
        raise TransformSpecError(
            f"transform_to_spec: {name} has {', '.join(f'{key}={args[key]!r}' for key in changed)}, which its "
            f"arguments ({', '.join(own)}) do not give: a spec cannot hold it (was it set on the object after "
            "building?); build the transform from its arguments alone")
    return own


def _entry_to_spec(serialized: dict[str, Any], transform: A.BasicTransform | A.BaseCompose) -> dict[str, Any]:
    args = {k: v for k, v in serialized.items() if k != "__class_fullname__"}
    name = serialized["__class_fullname__"].rsplit(".", 1)[-1]
    if isinstance(transform, A.BasicTransform):
        args = _own_arguments(name, args, transform)
    if isinstance(transform, A.BaseCompose):
        args.update(_unserialized_arguments(transform, args))
        args["transforms"] = [_entry_to_spec(child, built)
                              for child, built in zip(args["transforms"], transform.transforms)]
    return {name: _yaml_safe(args)}


def transform_to_spec(
    transform: A.Compose | A.BasicTransform | A.BaseCompose | Sequence[A.BasicTransform | A.BaseCompose],
) -> TransformSpec:
    """The spec list (all arguments explicit) of a pipeline (``A.Compose``, e.g. built by
    :func:`build_transform`: its transforms, without its ``bbox_params``, which the package sets),
    of one transform or container, or of a list of them."""
    if isinstance(transform, A.Compose):
        items = list(transform.transforms)
    elif isinstance(transform, (A.BasicTransform, A.BaseCompose)):
        items = [transform]
    else:
        items = list(transform)
    return [_entry_to_spec(A.to_dict(item)["transform"], item) for item in items]


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

    def target_size(self, size: tuple[int, int], train: bool, rng: np.random.Generator | None = None) -> tuple[int, int]:
        """The ``(h, w)`` an image of ``size`` is resized to (random choice when ``train``: from ``rng``,
        else from torch's generator)."""
        height, width = size
        if self.mode == "none":
            return size
        if self.mode == "fixed":
            assert self.fixed_size is not None
            return self.fixed_size
        if train and len(self.min_sizes) > 1:
            choice = rng.integers(len(self.min_sizes)) if rng is not None else torch.randint(len(self.min_sizes), (1,))
            short = self.min_sizes[int(choice)]
        else:
            short = self.min_sizes[-1]
        scale = min(short / min(height, width), self.max_size / max(height, width))
        return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def _size_setters(transform: A.BasicTransform | A.BaseCompose) -> list[str]:
    """Names of the :data:`SIZE_SETTING_TRANSFORMS` in ``transform``, itself or in its containers."""
    if isinstance(transform, A.BaseCompose):
        return [name for child in transform.transforms for name in _size_setters(child)]
    return [type(transform).__name__] if type(transform).__name__ in SIZE_SETTING_TRANSFORMS else []


def _warn_size_setting(compose: A.Compose, setting: str) -> None:
    """Warn (one warning per pipeline) about the entries of ``compose`` that set the image size: under resize
    mode ``none``, training would run at their scale and evaluation and predict at the images' own."""
    entries = []
    for i, transform in enumerate(compose.transforms):
        names = _size_setters(transform)
        if names:
            inside = "" if names == [type(transform).__name__] else f" holding {', '.join(names)}"
            entries.append(f"[{i}] {type(transform).__name__}{inside}")
    if entries:
        warnings.warn(
            f"{setting} resizes the training images ({'; '.join(entries)}), but data.resize is 'none': "
            "validation, test and predict size images by data.resize alone, never by the train transforms, so "
            "the model would train at one scale and be evaluated at the images' own. Resize with data.resize "
            "instead, which training and evaluation share (shortest_edge with data.min_sizes and data.max_size, "
            "e.g. min_sizes [N] and max_size N for LongestMaxSize N; or fixed with data.fixed_size)", stacklevel=3)


class DetectionTransform:
    """Augment (albumentations) then resize a :class:`DetectionSample`, counting removed boxes.

    A box counts as removed when no part of it is left (a box split into fragments, as
    ``RandomGridShuffle`` does, is kept: its fragments are the boxes trained on). Each kept
    ground-truth box (each fragment) keeps its annotated area (``DetectionSample.annotation_areas``),
    which the resize leaves in original-image pixels, the scale of the recall's area ranges. A training
    pipeline holding a transform of :data:`SIZE_SETTING_TRANSFORMS` under resize mode ``none`` is
    warned about when built: evaluation and predict size images by the resize policy alone.

    Picklable. Called with an item's ``seed`` (:func:`~lightning_rpn.data.draws.item_seed`, what
    :class:`TransformedDataset` passes when it has a seed), the augmentations and the resize's
    choice are drawn from it alone, whichever worker, process or run applies them; without one
    the albumentations random state is seeded once per process from torch's seed (in a
    DataLoader worker, the worker's seed). ``pixel_only``
    (the data module's evaluation pipeline) refuses transforms that move pixels or boxes: predict
    maps boxes back by the resize alone. ``setting`` (``data.train_transforms`` or
    ``data.val_transforms``) is named in every error.
    """

    def __init__(
        self,
        spec: TransformSpec | None = None,
        min_visibility: float = 0.0,
        resize: ResizePolicy | None = None,
        train: bool = False,
        pixel_only: bool = False,
    ) -> None:
        self.min_visibility = min_visibility
        self.resize = resize or ResizePolicy()
        self.train = train
        self.setting = "data.train_transforms" if train else "data.val_transforms"
        self.compose = build_transform(spec, min_visibility, self.setting, pixel_only)  # checks the spec's type
        self.spec: TransformSpec = list(spec or [])
        if train and self.resize.mode == "none":
            _warn_size_setting(self.compose, self.setting)
        self._seeded_pid: int | None = None

    def _seed_for_process(self) -> None:
        if self._seeded_pid != os.getpid():
            worker = torch.utils.data.get_worker_info()
            seed_pipeline(self.compose, int(worker.seed if worker is not None else torch.initial_seed()) % 2**32)
            self._seeded_pid = os.getpid()

    def _pipeline_error(self, sample: DetectionSample, error: Exception) -> DataError:
        """A :class:`DataError` naming the image, its size and the setting of a pipeline that failed on it."""
        height, width = sample.image_size
        message = f"{self.setting} failed on this {width}x{height} (w x h) image: {type(error).__name__}: {error}"
        if type(error).__name__ == "CropSizeError":  # albumentations' own class, not exported at the top
            message += ("; the crop does not fit the image: put PadIfNeeded (min_height, min_width at least "
                        "the crop size) before the crop, use a smaller crop, or (large images) train on "
                        "windows with data.tiles instead of cropping")
        return DataError(message, file=sample.source, image_id=sample.image_id)

    def _checked_image(self, sample: DetectionSample, image: Any) -> np.ndarray:
        """``image`` when the pipeline returned an ``H x W x 3`` uint8 array; otherwise a :class:`DataError`
        naming the setting (a transform :func:`build_transform` does not know turned it into another format)."""
        if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            return image
        height, width = sample.image_size
        shape = tuple(getattr(image, "shape", ()))
        kind = f"{type(image).__name__} of shape {shape} dtype {getattr(image, 'dtype', '?')}"
        message = (f"{self.setting} turned this {width}x{height} (w x h) image into a {kind}, but it must "
                   "return H x W x 3 uint8 images: leave out the transform that changes the format "
                   "(Normalize, ToFloat, ToTensorV2, ToGray with one channel; the model normalises images itself)")
        raise DataError(message, file=sample.source, image_id=sample.image_id)

    def __call__(self, sample: DetectionSample, seed: int | None = None) -> DetectionSample:
        """``sample`` augmented and resized; with ``seed``, every random choice drawn from it."""
        image, boxes, crowd, areas = sample.image, sample.boxes, sample.crowd_boxes, sample.annotation_areas
        removed = 0
        if self.spec:
            if seed is None:
                self._seed_for_process()
            else:
                seed_pipeline(self.compose, seed)
                self._seeded_pid = None  # an unseeded call after this one seeds the process's stream again
            all_boxes = np.concatenate([boxes, crowd]) if len(crowd) else boxes
            labels = {_BOX_FIELD: [_GROUND_TRUTH] * len(boxes) + [_CROWD] * len(crowd),
                      _VISIBLE_FIELD: [1.0] * len(all_boxes), _ORIGIN_FIELD: list(range(len(all_boxes)))}
            try:
                out = self.compose(image=image, bboxes=all_boxes, **labels)
            except Exception as error:  # an albumentations error names neither the image nor the setting
                raise self._pipeline_error(sample, error) from error
            image = self._checked_image(sample, out["image"])
            kept = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            kept_kinds = np.asarray(out[_BOX_FIELD], dtype=np.int64).reshape(-1)
            boxes, crowd = kept[kept_kinds == _GROUND_TRUTH], kept[kept_kinds == _CROWD]
            origins = np.asarray(out[_ORIGIN_FIELD], dtype=np.int64).reshape(-1)[kept_kinds == _GROUND_TRUTH]
            removed = len(sample.boxes) - len(np.unique(origins))  # fragments of one box count once
            areas = None if areas is None else areas[origins]  # ground-truth rows come first: origin = row
        size = (int(image.shape[0]), int(image.shape[1]))
        drawn = None if seed is None or not self.train else np.random.default_rng([seed, 1])  # evaluation draws no size
        new_size = self.resize.target_size(size, self.train, drawn)
        if new_size != size:
            image = cv2.resize(image, (new_size[1], new_size[0]), interpolation=cv2.INTER_LINEAR)
            scale = np.array([new_size[1] / size[1], new_size[0] / size[0]] * 2, dtype=np.float32)
            boxes, crowd = boxes * scale, crowd * scale
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        removed += int((~valid).sum())
        out_sample = replace(
            sample,
            image=np.ascontiguousarray(image),
            boxes=boxes[valid],
            crowd_boxes=crowd[(crowd[:, 2] > crowd[:, 0]) & (crowd[:, 3] > crowd[:, 1])],
            removed_boxes=sample.removed_boxes + removed,
        )
        # annotated areas stay in original-image pixels, the scale of COCO's area ranges: the resize leaves them
        out_sample.set_annotation_areas(None if areas is None else areas[valid])
        return out_sample


class TransformedDataset(torch.utils.data.Dataset):
    """``dataset`` with ``transform`` applied to every item (a picklable wrapper).

    With a ``seed``, item ``index`` is transformed with ``item_seed(seed, index)`` (the transform
    takes it as ``seed=``: a :class:`DetectionTransform`), so its augmentation depends on the
    seed and the index alone; the data module sets it."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform: DetectionTransform | None,
                 seed: int | None = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> DetectionSample:
        sample = self.dataset[index]
        if self.transform is not None:
            seeded = {} if self.seed is None else {"seed": item_seed(self.seed, index)}
            sample = self.transform(sample, **seeded)
        sample.dataset_index = int(index)
        return sample
