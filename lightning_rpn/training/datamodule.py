"""RPNDataModule: datasets, augmentation, resize, padding and worker-side anchor targets.

The anchor configuration is declared once, on the model: in ``setup()`` the data module reads
``anchor_generator``, ``target_config``, ``box_coder``, ``size_divisibility`` (and the RPN's
sampling seed) from ``trainer.lightning_module``. Values given to the constructor are used when
there is no model (plain PyTorch use, benchmarks) and must agree with the model's when both
exist (a mismatch is a ``ValueError`` naming both). They are kept apart from the values in use,
so one data module serves several models in turn (a sweep), each as a fresh one would.

Each split's dataset is built by :mod:`~lightning_rpn.training.split_datasets` (the paths under
``root``); ``predict_images`` (a folder of images) overrides the predict split, which defaults
to the validation split. Removed boxes and load problems are counted over a run and reported at
its end (:mod:`~lightning_rpn.training.data_report`).

Over 350 lines for one reason: the flat constructor (forty arguments, each documented) is the
``data:`` section of the YAML configs; what it configures lives in the modules named above.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.targets import AnchorTargetConfig
from lightning_rpn.data.accounting import BoxAccounting
from lightning_rpn.data.annotated import AnnotatedDataset
from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.data.collate import RPNCollate
from lightning_rpn.data.draws import SameItems, ShuffledEpochs
from lightning_rpn.data.folder import ImageFolder
from lightning_rpn.data.problems import BadAnnotationPolicy, DataError, check_policy
from lightning_rpn.data.repeat import RepeatedDataset, repeats_to_fill
from lightning_rpn.data.tiles import TileConfig, TiledDataset, WindowSampler
from lightning_rpn.data.window_sampler import OverfitWindowSampler, ResumableLoader, WindowProgress
from lightning_rpn.data.transforms import DetectionTransform, ResizePolicy, TransformedDataset, TransformSpec
from lightning_rpn.data.validation import DatasetReport, listing_file, no_boxes_problem, validate_dataset
from lightning_rpn.training.anchor_agreement import AnchorSetting, AnchorSetup, agree_with_model
from lightning_rpn.training.data_report import MAX_WARNED_PROBLEMS, RunDataReport
from lightning_rpn.training.resume_state import epoch_batches_trained
from lightning_rpn.training.split_datasets import build_split_dataset, check_split_paths

__all__ = ["RPNDataModule", "DEFAULT_TRAIN_TRANSFORMS", "MAX_WARNED_PROBLEMS"]

DEFAULT_TRAIN_TRANSFORMS: TransformSpec = [{"HorizontalFlip": {"p": 0.5}}]

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class RPNDataModule(LightningDataModule):
    """Data for RPN training: synthetic shapes (default), dense scenes, COCO or Pascal VOC.

    Args:
        dataset: ``"synthetic"`` | ``"scenes"`` (generated aerial-like scenes) | ``"coco"`` | ``"voc"``.
        root: dataset folder (COCO / VOC).
        train_split / val_split / test_split / predict_split: split names (``None``: no such
            split; predict defaults to ``val_split``). COCO: e.g. ``train2017``; VOC: e.g.
            ``trainval`` and ``test``; synthetic: any name (seeds the images).
        predict_images: a folder of images to predict on (no annotations needed); its unreadable
            images follow ``on_bad_annotation`` (``skip`` / ``clip`` leave them out: :class:`ImageFolder`).
        coco_images / coco_annotations: COCO paths under ``root``, ``{split}`` filled in.
        category_ids / category_names: keep only these categories (COCO ids or names; VOC names).
        keep_difficult: VOC ``difficult`` objects as ground truth (default: crowd boxes).
        include_crowd: keep COCO ``iscrowd`` boxes as crowd boxes (ignored in matching/recall).
        on_bad_annotation: ``"raise"`` | ``"skip"`` | ``"clip"`` (structural errors raise by default).
        verify_images: decode every image in ``setup``, before the first step (finds missing,
            corrupt, truncated and mis-sized files; handled by ``on_bad_annotation``).
        scene_options: ``DenseScenes`` arguments for ``dataset="scenes"`` (``size``, ``objects``,
            ``background``, ``density``, ...); the scene counts are ``synthetic_train_images`` /
            ``synthetic_val_images``.
        synthetic_*: SyntheticShapes parameters (images in the train split / in any other split,
            image side range, most shapes per image, smallest shape side, shape kinds: default
            all of ``SHAPE_KINDS``, kinds drawn without boxes, share of outlined shapes and whether
            they are drawn without boxes, share of checkerboard-textured filled shapes and whether
            they are drawn without boxes: the cross-category protocol of ``bench/bench_heads.py``).
        seed: seed of the synthetic images, of ``tiles``' windows and of the evaluation
            augmentations (``val_transforms``, per image). Training's order and augmentations
            come from the run's seed (``seed_everything``), per epoch and per item, whichever
            process or worker draws them, and a checkpoint keeps it (``data.draws``).
        batch_size / val_batch_size: images per batch (validation defaults to ``batch_size``).
        num_workers: DataLoader workers (persistent when > 0); pin_memory: pinned batches.
        train_transforms / val_transforms: albumentations spec lists (see ``transforms``);
            ``None`` gives ``[{"HorizontalFlip": {"p": 0.5}}]`` for training and nothing for
            evaluation. ``val_transforms`` may only change pixel values (no flip, crop, pad or
            resize: ``resize`` sizes evaluation images, and predict maps boxes back by it alone).
        min_visibility: ground-truth boxes keeping less than this fraction of their area before
            the transforms (or in a training window) are removed (counted, and reported at the
            end of the run); crowd boxes stay while any part of them is in the image.
        tiles: train on random windows of the training images (``TileConfig`` keys ``size``,
            ``per_epoch``, ``overlap``, ``weighting``, ``box_probability``, ``cache_mb``): an
            epoch is ``per_epoch`` windows, drawn from the seed, the epoch and the window's index.
        repeats: list the training images this many times per epoch (each copy its own random
            augmentation and anchor sample); ``None``: once, or, when the split holds fewer
            images than ``batch_size`` per process, just enough times to fill one batch (logged;
            the epoch's last, partial batch is then dropped, a different one each epoch), so a
            batch has ``batch_size`` items as configured. Not with ``tiles``.
        resize / min_sizes / max_size / fixed_size: the resize policy (``ResizePolicy``).
        size_divisibility: pad batches to a multiple of this (default: the model's).
        anchor_generator / target_config / box_coder: anchor setup when there is no model.
        sampling_seed: seed of anchor sampling (default: the model RPN's ``seed``, else 0).
        assign_targets: compute anchor targets in the workers (else the model does).
    """

    # the values in use (``anchor_setup``): the model's once attached; assigning one sets the user's own
    anchor_generator = AnchorSetting()
    target_config = AnchorSetting()
    box_coder = AnchorSetting()
    size_divisibility = AnchorSetting()
    sampling_seed = AnchorSetting()

    def __init__(
        self,
        dataset: Literal["synthetic", "scenes", "coco", "voc"] = "synthetic",
        root: str | None = None,
        train_split: str | None = "train",
        val_split: str | None = "val",
        test_split: str | None = None,
        predict_split: str | None = None,
        predict_images: str | None = None,
        coco_images: str = "{split}",
        coco_annotations: str = "annotations/instances_{split}.json",
        category_ids: list[int] | None = None,
        category_names: list[str] | None = None,
        keep_difficult: bool = False,
        include_crowd: bool = True,
        on_bad_annotation: BadAnnotationPolicy = "raise",
        verify_images: bool = False,
        synthetic_train_images: int = 1000,
        synthetic_val_images: int = 200,
        synthetic_min_size: int = 128,
        synthetic_max_size: int = 192,
        synthetic_max_shapes: int = 6,
        synthetic_min_box_size: float = 8.0,
        synthetic_shape_kinds: list[str] | None = None,
        synthetic_unannotated_kinds: list[str] | None = None,
        synthetic_outlined_fraction: float = 0.3,
        synthetic_unannotated_outlined: bool = False,
        synthetic_textured_fraction: float = 0.0,
        synthetic_unannotated_textured: bool = False,
        scene_options: dict[str, Any] | None = None,
        seed: int = 0,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        train_transforms: list[dict[str, Any]] | None = None,
        val_transforms: list[dict[str, Any]] | None = None,
        min_visibility: float = 0.3,
        tiles: dict[str, Any] | None = None,
        repeats: int | None = None,
        resize: Literal["none", "shortest_edge", "fixed"] = "none",
        min_sizes: list[int] | None = None,
        max_size: int = 1333,
        fixed_size: list[int] | None = None,
        size_divisibility: int | None = None,
        anchor_generator: AnchorGenerator | None = None,
        target_config: AnchorTargetConfig | None = None,
        box_coder: BoxCoder | None = None,
        sampling_seed: int | None = None,
        assign_targets: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in ("synthetic", "scenes", "coco", "voc"):
            raise ValueError(
                f"RPNDataModule: dataset={dataset!r} is not one of 'synthetic', 'scenes', 'coco', 'voc'"
            )
        if scene_options is not None and dataset != "scenes":
            raise ValueError(f"RPNDataModule: scene_options apply to dataset='scenes' only, not {dataset!r}")
        if dataset in ("coco", "voc") and root is None:
            raise ValueError(f"RPNDataModule: dataset={dataset!r} needs root (the dataset folder)")
        if dataset == "voc" and category_ids is not None:
            raise ValueError("RPNDataModule: VOC classes are chosen by name (data.category_names); "
                             f"data.category_ids={category_ids!r} applies to COCO only")
        check_policy(on_bad_annotation, "RPNDataModule")
        if batch_size <= 0 or (val_batch_size is not None and val_batch_size <= 0) or num_workers < 0:
            raise ValueError(
                f"RPNDataModule: batch_size={batch_size}, val_batch_size={val_batch_size} must be > 0 "
                f"and num_workers={num_workers} >= 0"
            )
        self.tiles = None if tiles is None else TileConfig.from_mapping(tiles)
        if repeats is not None and (repeats < 1 or self.tiles is not None):
            raise ValueError(f"RPNDataModule: repeats={repeats} must be >= 1, and is not used with tiles "
                             "(tiles.per_epoch sets the epoch's length)")
        self.repeats = repeats
        self._drop_last_train = False  # set when setup repeats a small split to fill batches
        self.save_hyperparameters(ignore=["anchor_generator", "target_config", "box_coder"])
        self.dataset = dataset
        self.root = None if root is None else Path(root)
        self.splits = {"train": train_split, "val": val_split, "test": test_split,
                       "predict": predict_split if predict_split is not None else val_split}
        self.predict_images = predict_images
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.resize_policy = ResizePolicy(
            resize, tuple(min_sizes) if min_sizes else (800,), max_size,
            None if fixed_size is None else tuple(fixed_size),  # type: ignore[arg-type]
        )
        self.train_transform = DetectionTransform(
            DEFAULT_TRAIN_TRANSFORMS if train_transforms is None else train_transforms,
            min_visibility, self.resize_policy, train=True)
        # the evaluation pipeline also runs predict, which maps boxes back by the resize alone: pixel values only
        self.val_transform = DetectionTransform(val_transforms or [], min_visibility, self.resize_policy, train=False,
                                                pixel_only=True)
        # what the user gave (None: the model's), and what is in use: resolved from it for each model
        self.given_anchor_setup = self.anchor_setup = AnchorSetup(
            anchor_generator, target_config, box_coder, size_divisibility, sampling_seed)
        self.assign_targets = assign_targets
        self.datasets: dict[str, Dataset] = {}
        self.data_report = RunDataReport()
        self._collate: tuple[AnchorSetup, RPNCollate] | None = None  # the collate and the setup it was built for
        self._window_eval = False  # the model proposes on sliding windows: no evaluation targets
        self._window_progress: WindowProgress | None = None  # the items of the epoch training has trained
        self._window_resume: tuple[int, int] | None = None  # (epoch, items done) of a loaded checkpoint
        self._draw_seed: int | None = None  # this fit's seed of training's order and augmentations (data.draws)

    # ---- datasets -------------------------------------------------------------------------
    def build_dataset(
        self,
        split: str,
        on_bad_annotation: BadAnnotationPolicy | None = None,
        verify_images: bool | None = None,
        report_unsafe_paths: bool = False,
    ) -> Dataset:
        """The untransformed dataset of split ``split`` (a name such as ``"val2017"``).

        ``on_bad_annotation`` / ``verify_images`` override the configured values;
        ``report_unsafe_paths`` records image paths escaping their root as problems instead
        of raising (what ``check-data`` uses).
        """
        hp = self.hparams
        return build_split_dataset(
            hp, self.root, split, split == self.splits["train"], on_bad_annotation or hp.on_bad_annotation,
            hp.verify_images if verify_images is None else verify_images, report_unsafe_paths,
        )

    def prepare_data(self) -> None:
        """Nothing to download; checks that the dataset folder exists and, with a trainer, that it
        holds the files and folders of the splits the trainer's stage reads, or that ``predict_images``
        is a folder (without one, ``setup`` finds a missing split: ``prepare_data`` then
        ``setup("fit")`` needs no test split). Lightning calls it before its loggers start their run (a
        W&B run), ``setup`` after: a wrong path, or no split for a validate / test / predict, stops the
        command before there is a run. Nothing is read (:func:`check_split_paths`); ``setup`` reads the
        splits once."""
        if self.root is not None and not self.root.is_dir():
            raise DataError(f"RPNDataModule: root {str(self.root)!r} is not a folder (dataset={self.dataset!r}); "
                            f"set --data.root to the dataset's folder")
        fn = self._trainer_fn()
        for role in _STAGE_SPLITS.get(str(fn.value), ()) if fn is not None else ():
            if role == "predict" and self.predict_images is not None:
                if not Path(self.predict_images).is_dir():
                    raise DataError("image folder does not exist; set --data.predict_images to a folder of images",
                                    file=str(self.predict_images))
            elif self.splits[role] is None:
                if not (role == "val" and fn == TrainerFn.FITTING):  # fit may go without val
                    raise self._no_split(role)
            elif self.root is not None:
                check_split_paths(self.hparams, self.root, self.splits[role])

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` (all of them when ``None``) and take the model's anchors;
        a trainer's fit starts without the draws' seed and position of an earlier one (its
        checkpoint, loaded after this, sets them)."""
        self._resolve_anchors()
        if stage == "fit" and self._trainer_fn() == TrainerFn.FITTING:
            self._draw_seed, self._window_resume = None, None
        roles = _STAGE_SPLITS.get(stage, ()) if stage else ("train", "val", "test", "predict")
        for role in roles:
            if role in self.datasets:
                continue
            if role == "predict" and self.predict_images is not None:
                raw: Dataset = ImageFolder(self.predict_images, self.hparams.on_bad_annotation,
                                           self.hparams.verify_images)
            elif self.splits[role] is None:
                continue
            else:
                raw = self.build_dataset(self.splits[role])  # type: ignore[arg-type]
                self._check_not_empty(role, raw)
                self._check_has_boxes(role, raw)
                if role == "train" and self.tiles is not None:
                    raw = TiledDataset(raw, self.tiles, self.hparams.min_visibility, self.hparams.seed,
                                       str(self.splits[role]))
            problems = getattr(raw, "problems", None)
            if problems is not None and len(problems):
                rank_zero_info(f"RPNDataModule: {role} split {self.splits[role]!r}: "
                               f"{len(problems)} annotation problems handled\n{problems.summary()}")
            if role == "train" and self.tiles is None:
                times = self._train_repeats(len(raw))  # type: ignore[arg-type]
                raw = raw if times == 1 else RepeatedDataset(raw, times)
            if role == "train":  # its seed is the run's, set as the loader is made (_training_draws)
                self.datasets[role] = TransformedDataset(raw, self.train_transform)
            else:
                self.datasets[role] = TransformedDataset(raw, self.val_transform, seed=int(self.hparams.seed))

    def _check_not_empty(self, role: str, dataset: Dataset) -> None:
        """A :class:`DataError` naming the split and its file when ``dataset`` has no image (none
        listed, or every one dropped by ``on_bad_annotation``), before a DataLoader fails on it."""
        if len(dataset):  # type: ignore[arg-type]
            return
        problems = getattr(dataset, "problems", None)
        dropped = f"; every image was dropped:\n{problems.summary()}" if problems is not None and len(problems) else ""
        raise DataError(f"RPNDataModule: the {role} split {self.splits[role]!r} holds no images "
                        f"(dataset={self.dataset!r}, root={None if self.root is None else str(self.root)!r}){dropped}",
                        file=listing_file(dataset))

    def _check_has_boxes(self, role: str, dataset: Dataset) -> None:
        """Refuse a train split whose images hold no ground-truth box (a :class:`DataError` naming the
        split, its file and the likely causes); warn, once, about a val or test split without one
        (its recall is undefined). Only annotated datasets are checked: their boxes are known without
        decoding an image (generated ones always have boxes)."""
        if role == "predict" or not isinstance(dataset, AnnotatedDataset):
            return
        if any(len(record.boxes) for record in dataset.records):
            return
        crowd = sum(len(record.crowd_boxes) for record in dataset.records)
        problem = no_boxes_problem(role, len(dataset.records), crowd, listing_file(dataset))
        where = f"RPNDataModule: the {role} split {self.splits[role]!r} (dataset={self.dataset!r})"
        if role == "train":
            handled = f"\nannotation problems handled:\n{dataset.problems.summary()}" if len(dataset.problems) else ""
            raise DataError(f"{where}: {problem.detail}{handled}", file=problem.file)
        rank_zero_warn(f"{problem.file}: {where}: {problem.detail}")

    def _trainer_fn(self) -> TrainerFn | None:
        """What the attached trainer runs (``None`` without one)."""
        return getattr(getattr(self.trainer, "state", None), "fn", None)

    @property
    def _world_size(self) -> int:
        """The trainer's number of processes (1 without a trainer)."""
        return int(getattr(self.trainer, "world_size", 1) or 1)

    def _train_repeats(self, num_images: int) -> int:
        """``repeats``, or the fewest listings that fill one batch on every process (logged)."""
        if self.repeats is not None:
            return self.repeats
        world_size = self._world_size
        times = repeats_to_fill(num_images, self.batch_size, world_size)
        self._drop_last_train = times > 1
        if times > 1:
            processes = f" x {world_size} processes" if world_size > 1 else ""
            rank_zero_info(
                f"RPNDataModule: the train split {self.splits['train']!r} holds {num_images} images, fewer "
                f"than batch_size={self.batch_size}{processes}: each epoch lists them {times} times so that "
                "batches are full (data.repeats sets this; data.tiles draws random windows of large images)")
        return times

    # ---- anchors --------------------------------------------------------------------------
    def _resolve_anchors(self, module: Any = None) -> None:
        """Take the anchor setup from the model when there is one; check it agrees with the user's
        (:func:`agree_with_model`). Resolved from the user's values each time, never from the last
        model's: the data module may be attached to another model since."""
        if module is None and self.trainer is not None:
            module = getattr(self.trainer, "lightning_module", None)
        if module is not None:
            self.anchor_setup = agree_with_model(self.given_anchor_setup, module)
            self._window_eval = getattr(module, "sliding_window", None) is not None

    @property
    def collate(self) -> RPNCollate:
        """The batch collate for the current anchor setup (built on first use, and again when it changes)."""
        if self._collate is None or self._collate[0] is not self.anchor_setup:
            self._collate = self.anchor_setup, RPNCollate(
                self.anchor_generator, self.target_config, self.box_coder, self.size_divisibility,
                seed=self.sampling_seed or 0, assign_targets=self.assign_targets,
            )
        return self._collate[1]

    # ---- loaders --------------------------------------------------------------------------
    def _loader(self, role: str, batch_size: int, collate: RPNCollate | None = None,
                sampler: Sampler | None = None) -> DataLoader:
        dataset = self._dataset(role)
        if role == "train":
            dataset, sampler = self._training_draws(dataset, batch_size)  # type: ignore[arg-type]
        return (ResumableLoader if role == "train" else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate or self.collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=role == "train" and self._drop_last_train,
            generator=None if role == "train" else self._evaluation_generator(),
        )

    def _training_draws(self, dataset: TransformedDataset, batch_size: int) -> tuple[Dataset, WindowSampler]:
        """The training loader's dataset and sampler, every draw made from the run's seed and the item.

        The item index is the draw (:mod:`~lightning_rpn.data.draws`): ``epoch * n + j`` is the
        ``j``-th item of the epoch, of tiled windows or of the split in the epoch's order, and
        seeds its augmentation. :class:`WindowSampler` hands out the epoch's indices, this
        process's share, after those a resumed checkpoint had trained: a run resumed inside an
        epoch with any number of workers trains what an uninterrupted one does (on another number
        of processes, :meth:`WindowProgress.first_batch` warns of what Lightning's count leaves out).
        Under ``overfit_batches`` every epoch serves epoch 0's items, each epoch's draws its own
        (:class:`SameItems`, :class:`OverfitWindowSampler`)."""
        seed = self._run_draw_seed()
        items = dataset.dataset if self.tiles is not None else ShuffledEpochs(dataset.dataset, seed)
        trainer = self.trainer
        overfit = getattr(trainer, "overfit_batches", 0) > 0
        if overfit:
            items = SameItems(items)
        per_epoch = len(items)  # type: ignore[arg-type]
        unit = ("window", "data.tiles.per_epoch") if self.tiles is not None else ("image", "the train split")
        self._window_progress = WindowProgress(per_epoch, *self._window_start(batch_size), unit=unit,
                                               drop_last=self._drop_last_train)
        sampler = (OverfitWindowSampler if overfit else WindowSampler)(
            per_epoch, self._world_size, trainer.global_rank if trainer else 0, done=self._window_progress.begin)
        # persistent workers take the first indices as Lightning makes the iterator, before its set_epoch
        sampler.set_epoch(self._window_progress.epoch)
        return TransformedDataset(items, dataset.transform, seed), sampler

    def _run_draw_seed(self) -> int:
        """The seed of this fit's order and augmentations, chosen as its first training loader is
        made and kept for its later ones (``reload_dataloaders_every_n_epochs``): the resumed
        checkpoint's, so that a resumed run draws what it would have; else Lightning's global seed
        (``seed_everything``), else torch's initial seed; rank 0's on every process."""
        if self._draw_seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            self._draw_seed = int(self.trainer.strategy.broadcast(seed)) if self._world_size > 1 else seed
        return self._draw_seed

    def _dataset(self, role: str) -> Dataset:
        """The dataset of ``role`` (``"train"``, ``"val"``, ...), set up on first use."""
        if role not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[role])
        if role not in self.datasets:
            raise self._no_split(role)
        return self.datasets[role]

    @staticmethod
    def _no_split(role: str) -> DataError:
        """The error of a command that reads split ``role`` (``"val"``, ...) when none is configured."""
        return DataError(f"RPNDataModule: no {role} split to load: {role}_split is None. Name one with "
                         f"RPNDataModule({role}_split=...) or --data.{role}_split NAME"
                         + (" (or --data.predict_images FOLDER)" if role == "predict" else ""))

    def _evaluation_generator(self) -> torch.Generator:
        """The random source of an evaluation loader (its workers' seeds). Without one, making its
        iterator takes a draw from torch's RNG, which training draws from too: how often fit validates,
        and whether it runs Lightning's sanity check, would change the training that follows."""
        return torch.Generator().manual_seed(int(self.hparams.seed))

    def _window_start(self, batch_size: int) -> tuple[int, int]:
        """``(epoch, items of it trained)`` that training starts at: a loaded checkpoint's
        position; else the trainer's epoch from its start, or, resuming a checkpoint saved without
        that position, the trainer's count of batches at today's world size and batch size."""
        if self._window_resume is not None:
            start, self._window_resume = self._window_resume, None
            return start
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.restarting:
            return (0 if trainer is None else trainer.current_epoch), 0
        batches = trainer.fit_loop.epoch_loop.batch_progress
        epoch, done = WindowProgress.resume_position({
            "epoch": trainer.fit_loop.epoch_progress.current.processed, "finished": epoch_batches_trained(batches),
            "done": batches.current.processed * batch_size * trainer.world_size})
        if done and self.tiles is None:
            rank_zero_warn(f"RPNDataModule: the checkpoint was saved inside epoch {epoch} by a version before "
                           "2026-12-07, which kept no order of its images: the rest of that epoch is drawn in "
                           f"today's order, so some of its images are trained twice and others not (its first {done} "
                           "of today's order are skipped); the epochs after it are whole")
        return epoch, done

    def _first_window_batch(self, trainer: Any) -> None:
        """Give the epoch's progress the trainer's batch count as an epoch's first batch comes; warn
        (once) when a resumed epoch cannot train exactly the items it has left."""
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        message = self._window_progress.first_batch(batches, self.batch_size, trainer.world_size)
        if message is not None:
            rank_zero_warn(f"RPNDataModule: {message}")

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in its epoch and the seed of its draws (checkpoints keep them, so that
        a resumed run trains the rest of the epoch as it would have: :class:`WindowProgress`,
        :mod:`~lightning_rpn.data.draws`)."""
        trainer, progress = self.trainer, self._window_progress
        if trainer is None or progress is None:
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress
        position = progress.state(batches.current.processed, self.batch_size, trainer.world_size,
                                  epoch_batches_trained(batches))
        return {"draws": {**position, "seed": self._draw_seed}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Where a resumed fit's training stood (``tiles``: saved by tiled training before 2026-12-07,
        without a seed): its training loader starts there, with its seed. A validate, test or predict
        of the checkpoint trains nothing and takes neither."""
        state = state_dict.get("draws", state_dict.get("tiles"))
        if state is None or self._trainer_fn() not in (None, TrainerFn.FITTING):
            return
        self._window_resume = WindowProgress.resume_position(state)
        if state.get("seed") is not None:
            self._draw_seed = int(state["seed"])

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    def _collate_without_targets(self) -> RPNCollate:
        return RPNCollate(self.anchor_generator, self.target_config, self.box_coder,
                          self.size_divisibility, assign_targets=False)

    def _evaluation_loader(self, role: str) -> DataLoader:
        # a model on sliding windows computes its evaluation losses per window: whole-image targets would be wasted
        collate = self._collate_without_targets() if self._window_eval else None
        sampler = self._unrepeated_sampler(self._dataset(role), role)
        return self._loader(role, self.val_batch_size, collate=collate, sampler=sampler)

    def _unrepeated_sampler(self, dataset: Dataset, role: str) -> Sampler | None:
        """This process's share of an evaluation split under several processes, no image repeated.

        Lightning's ``DistributedSampler`` pads the shares to one length by repeating images, which
        the recall then counted twice (7 images on 2 processes: AR@100 0.200 against 0.189 on one).
        The recall's states are summed over the processes and the losses weighted by batch size, so
        unequal shares give the single process's figures. ``None`` (Lightning's sampler) on one
        process, with ``use_distributed_sampler`` false, with fewer images than processes (a
        process without an image cannot take part in the evaluation's collective calls), and with a
        fractional ``limit_val_batches`` / ``limit_test_batches`` (Lightning refuses, on one
        process only, a share that the fraction rounds to no batch)."""
        trainer = self.trainer
        shares = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
        connector = getattr(trainer, "_accelerator_connector", None)
        if not shares or not getattr(connector, "use_distributed_sampler", True):
            return None
        limit = getattr(trainer, f"limit_{role}_batches", 1.0)
        if isinstance(limit, float) and limit < 1.0:
            return None
        if shares["num_replicas"] < 2 or len(dataset) < shares["num_replicas"]:
            return None
        return UnrepeatedDistributedSampler(dataset, num_replicas=shares["num_replicas"], rank=shares["rank"],
                                            shuffle=False)

    def val_dataloader(self) -> DataLoader | list:
        """The val split's loader; ``[]`` while fitting without a val split (``val_split: null``), which
        Lightning reads as "no validation" (``validate`` without one is a ``DataError``)."""
        if self.splits["val"] is None and self._trainer_fn() == TrainerFn.FITTING:
            warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")  # meant so
            return []
        return self._evaluation_loader("val")

    @property
    def has_val_split(self) -> bool:
        """Whether a val split is configured (``fit`` validates on it; without one, fit does not validate)."""
        return self.splits["val"] is not None

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def predict_dataloader(self) -> DataLoader:
        loader = self._loader("predict", self.val_batch_size, collate=self._collate_without_targets())
        self._check_an_image_per_process(len(self.datasets["predict"]))
        return loader

    def _check_an_image_per_process(self, num_images: int) -> None:
        """Refuse ``predict`` on more processes than images, naming the fix.

        Lightning's predict hands each process its own share without repeating an image (the
        proposal files hold each once) and fails with a bare ``AssertionError`` when a share is empty.
        """
        world_size = self._world_size
        if num_images >= world_size:
            return
        source = (f"the folder {str(self.predict_images)!r}" if self.predict_images is not None
                  else f"the predict split {self.splits['predict']!r}")
        raise DataError(f"RPNDataModule: predict runs on {world_size} processes but {source} holds {num_images} "
                        f"image(s), and each process needs one: run it with --trainer.devices {max(num_images, 1)}")

    def check_data(
        self, model: Any = None, splits: Sequence[str] = ("train", "val"), check_images: bool = True
    ) -> DatasetReport:
        """The ``check-data`` report of ``splits`` (roles), with anchor coverage when anchors are known.

        ``model`` (an ``RPNModule``) supplies the anchor setup, as in ``setup``.
        """
        self._resolve_anchors(model)
        return validate_dataset(self, check_images=check_images, splits=splits)

    # ---- reporting ------------------------------------------------------------------------
    @property
    def accounting(self) -> BoxAccounting:
        """Boxes removed and load problems counted since the last :meth:`report`."""
        return self.data_report.accounting

    @property
    def last_report(self) -> dict[str, float]:
        """The counts of the last :meth:`report` as metrics (empty before the first one)."""
        return self.data_report.last

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count removed boxes and load problems; warn about each load problem the first time it occurs."""
        if isinstance(batch, RPNBatch):
            trainer = self.trainer
            stage = str(trainer.state.stage.value) if trainer is not None and trainer.state.stage else "run"
            if trainer is not None:
                self.data_report.process = (trainer.global_rank, trainer.world_size)
            if trainer is not None and trainer.training and self._window_progress is not None:
                self._first_window_batch(trainer)
            # the sanity check's batches are validation's: their problems are warned about as
            # validation's, and counted when validation loads them
            sanity = trainer is not None and trainer.sanity_checking
            self.data_report.add_batch("validate" if sanity else stage,
                                       trainer.current_epoch if trainer is not None else 0, batch, counted=not sanity)
        return batch

    def report(self) -> str:
        """Print (rank zero) and return the counts since the last report, then reset them.

        Called once at the end of each ``fit`` / ``validate`` / ``test`` / ``predict`` run
        (``teardown``), so the report covers the whole run: every epoch, train and val.
        """
        return self.data_report.report()

    def teardown(self, stage: str) -> None:
        self.report()
