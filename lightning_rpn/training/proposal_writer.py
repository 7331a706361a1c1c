"""ProposalWriter: the Lightning callback that writes a ``predict`` run's proposals to files.

The formats, readers and writers are in :mod:`lightning_rpn.evaluation.proposal_files` (no
Lightning); this callback collects each rank's predictions and writes them there, DDP included,
in files named after the checkpoint that never replace an earlier predict's.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.evaluation.proposal_files import (
    FORMATS,
    merge_proposal_parts,
    proposal_records,
    remove_stale_temporaries,
    write_coco_proposals,
    write_detectron2_proposals,
)
from lightning_rpn.training.run_files import (
    checkpoint_stem, evaluation_command, listed_paths, output_repeat, repeated,
)

__all__ = ["ProposalWriter", "dataset_category_id", "predicted_category_id", "proposal_paths"]


def proposal_paths(output_dir: Path, stem: str, version: int = 0) -> dict[str, Path]:
    """Each format's file in ``output_dir`` for checkpoint ``stem`` (``proposals_coco-last.json``, ...).

    Named as the metrics summary of the same predict is (``metrics/predict-<stem>.json``); a
    repeat ``version`` 1, 2, ... adds ``.2``, ``.3``, ... after the stem
    (:func:`~lightning_rpn.training.run_files.repeated`).
    """
    return {name: repeated(output_dir / f"{Path(file).stem}-{stem}{Path(file).suffix}", version)
            for name, file in FORMATS.items()}


def dataset_category_id(dataset: Any) -> int | None:
    """The lowest category id ``dataset`` (or a dataset it wraps, ``.dataset``) keeps, or ``None``.

    A COCO dataset (:class:`~lightning_rpn.data.coco.COCODetection`, or any dataset with
    ``kept_category_ids``) keeps its ``category_ids`` filter, else every category of its
    annotation file.
    """
    seen: set[int] = set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        if hasattr(dataset, "kept_category_ids"):
            return min(dataset.kept_category_ids, default=None)
        dataset = getattr(dataset, "dataset", None)
    return None


def predicted_category_id(trainer: pl.Trainer) -> int:
    """The COCO ``category_id`` of the proposals of ``trainer``'s predict: the predicted dataset's
    (:func:`dataset_category_id`), else 1."""
    loaders = getattr(trainer, "predict_dataloaders", None)
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    found = dataset_category_id(getattr(loader, "dataset", None))
    return 1 if found is None else found


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` unless it holds files (another rank's parts, or a user's)."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _warn_images_without_proposals(without: int, images: int, model: pl.LightningModule) -> None:
    """Say on stderr that ``without`` of ``images`` predicted images got no proposal (their entries in
    the files are empty), and which of the model's filters drop proposals (all of them when every
    image is empty: a threshold too high, or weights that never trained)."""
    settings = getattr(model, "hparams", {})
    named = [f"model.{name} {settings[name]:g}" for name in ("score_thresh", "min_size") if name in settings]
    filters = f" ({', '.join(named)} drop proposals)" if named else ""
    share = "every one" if without >= images else f"{without} of {images}"
    print(f"ProposalWriter: {share} of the predicted images got no proposal{filters}; their entries in the "
          "files are empty", file=sys.stderr)


class ProposalWriter(BasePredictionWriter):
    """Write ``predict`` proposals of a whole dataset for a second stage (COCO JSON, detectron2 pickle).

    Consumes :meth:`~lightning_rpn.training.module.RPNModule.predict_step` outputs (per image
    ``image_id``, ``boxes`` in original-image pixels, ``scores``) and keeps the ``top_k`` best
    proposals of each image. Each rank appends its images to ``output_dir/.parts/rank<k>.pkl``
    as batches arrive; at the end of the epoch rank 0 merges the parts (deduplicated, dataset
    order), writes the files of ``formats`` into ``output_dir`` atomically and removes the parts.
    Memory: the merge reads the parts one image at a time
    (:func:`~lightning_rpn.evaluation.proposal_files.merge_proposal_parts`) and the COCO JSON is
    written as it is read; the detectron2 pickle, one pickled dict, holds every image's kept boxes
    and logits while it is written (as detectron2 does when it loads it). Lightning's
    ``trainer.predict`` also keeps every prediction unless it is called with
    ``return_predictions=False``, which ``lightning-rpn predict`` passes when a prediction writer
    is among the callbacks. ``output_dir`` must be visible to every rank (a shared
    filesystem for multi-node runs). One predict dataloader. A predict that fails or is
    interrupted (Ctrl+C) removes its parts; when a predict starts, rank 0 removes the temporary
    files a killed predict's write left in ``output_dir``
    (:func:`~lightning_rpn.evaluation.proposal_files.remove_stale_temporaries`) and says so.

    The files are named after the checkpoint, as the metrics summary is
    (``proposals_coco-<checkpoint stem>.json``, ``proposals_detectron2-<checkpoint stem>.pkl``,
    ``no_checkpoint`` without one), and never replace a file: when a name is taken (the same
    checkpoint predicted again, e.g. on other images) this predict's files get the first free
    repeat number ``.2``, ``.3``, ... (not Lightning's ``-v1``, which checkpoint names carry:
    ``proposals_coco-best-v1.json`` is ``best-v1.ckpt``'s) and rank 0 prints on stderr which files
    stay and which are new. The repeat is the one every output of the predict takes
    (:func:`~lightning_rpn.training.run_files.output_repeat`: free for every format, the metrics
    summary and the recall-curve PNG too), and the summary of this predict lists these files and
    ``top_k``: ``predict-last.3.json`` describes ``proposals_coco-last.3.json``. Rank 0 alone
    decides the names and writes the files; ``written`` (format -> path) and ``version`` are the
    same on every rank once predict ends.

    Args:
        output_dir: folder of the files.
        formats: ``"coco_json"`` and / or ``"detectron2_pkl"``.
        top_k: proposals kept per image (the best-scored; ``None``: all that predict returned).
            The recall predict prints and summarises counts every proposal it returned.
        category_id: the ``category_id`` of every COCO result. ``None`` (default): the lowest
            category id the predicted dataset keeps (its ``category_ids`` filter, else the
            ``categories`` of its COCO ``annotation_file``), because pycocotools' class-agnostic
            evaluation (``params.useCats = 0``) still drops results whose category the annotation
            file does not list, scoring them 0; 1 when the dataset names no categories (a folder
            of images, VOC, synthetic data).
    """

    def __init__(
        self,
        output_dir: str = "proposals",
        formats: Sequence[str] = ("coco_json", "detectron2_pkl"),
        top_k: int | None = 1000,
        category_id: int | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        unknown = [f for f in formats if f not in FORMATS]
        if unknown or not formats:
            raise ValueError(f"ProposalWriter: formats {list(formats)!r} must be a non-empty subset of {list(FORMATS)}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"ProposalWriter: top_k must be positive or None, got {top_k}")
        self.output_dir = Path(output_dir)
        self.formats = tuple(formats)
        self.top_k = top_k
        self.category_id = category_id
        self.written: dict[str, Path] = {}
        self.version = 0
        self._handle: Any = None
        self._made_output_dir = False
        self._images_without_proposals = 0

    def _part(self, rank: int) -> Path:
        return self.output_dir / ".parts" / f"rank{rank}.pkl"

    def _files(self, trainer: pl.Trainer, repeat: int) -> list[Path]:
        """Every format's file of ``trainer``'s checkpoint at ``repeat``: the files of one predict share
        one number even when an earlier one wrote other formats."""
        return list(proposal_paths(self.output_dir, checkpoint_stem(trainer.ckpt_path), repeat).values())

    def outputs_at(self, trainer: pl.Trainer, repeat: int) -> list[Path]:
        """The files this writer writes at ``repeat`` in ``trainer``'s predict (none in another command):
        what :func:`~lightning_rpn.training.run_files.output_repeat` asks every callback."""
        return self._files(trainer, repeat) if evaluation_command(trainer) == "predict" else []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            removed = remove_stale_temporaries(self.output_dir)
            if removed:
                print(f"ProposalWriter: removed {', '.join(path.name for path in removed)} from {self.output_dir}, "
                      f"the unfinished file(s) of an earlier predict that was killed", file=sys.stderr)
        part = self._part(trainer.global_rank)
        self._made_output_dir = not self.output_dir.exists()
        part.parent.mkdir(parents=True, exist_ok=True)
        self._handle = part.open("wb")
        self.written, self.version = {}, 0
        self._images_without_proposals = 0

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A failed or interrupted predict: close and remove this rank's parts file (and the folder
        once empty), which no later step would merge, and ``output_dir`` when this predict made it
        and it stayed empty."""
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        self._part(trainer.global_rank).unlink(missing_ok=True)
        _remove_if_empty(self._part(trainer.global_rank).parent)
        if self._made_output_dir:
            _remove_if_empty(self.output_dir)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Sequence[Mapping[str, Any]],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if dataloader_idx != 0:
            raise ValueError(f"ProposalWriter: writes one predict dataloader, got dataloader_idx={dataloader_idx}")
        if self._handle is None:
            raise RuntimeError("ProposalWriter: write_on_batch_end before on_predict_start")
        if batch_indices is not None and isinstance(batch, RPNBatch) and len(batch_indices) == len(batch):
            batch_indices = [batch_indices[i] for i in batch.evaluated]  # predict_step leaves stand-ins out
        indices = list(batch_indices) if batch_indices is not None and len(batch_indices) == len(prediction) else None
        for position, (image_id, boxes, scores, logits) in enumerate(proposal_records(prediction, "ProposalWriter")):
            order = np.argsort(-(scores if logits is None else logits), kind="stable")[: self.top_k]
            index = None if indices is None else int(indices[position])
            kept_logits = None if logits is None else logits[order]
            self._images_without_proposals += int(len(order) == 0)
            pickle.dump((index, image_id, boxes[order], scores[order], kept_logits), self._handle,
                        protocol=pickle.HIGHEST_PROTOCOL)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        trainer.strategy.barrier("ProposalWriter.parts_written")
        count = torch.tensor(self._images_without_proposals, device=trainer.strategy.root_device)  # NCCL: on the GPU
        without = int(trainer.strategy.reduce(count, reduce_op="sum"))
        if trainer.is_global_zero:
            parts = [self._part(rank) for rank in range(trainer.world_size)]
            records = merge_proposal_parts(parts)
            stem = checkpoint_stem(trainer.ckpt_path)
            version, kept = output_repeat(trainer, lambda v: self._files(trainer, v))
            paths = proposal_paths(self.output_dir, stem, version)
            if kept:
                print(
                    f"ProposalWriter: files of an earlier predict of a checkpoint named {stem!r} "
                    f"({listed_paths(kept)}); they stay, this predict writes "
                    + ", ".join(paths[name].name for name in self.formats),
                    file=sys.stderr,
                )
            coco = ""
            for name in self.formats:
                path = paths[name]
                if name == "coco_json":
                    category_id = self.category_id if self.category_id is not None else predicted_category_id(trainer)
                    write_coco_proposals(path, records, category_id=category_id)
                    coco = f" (COCO category_id {category_id})"
                else:
                    write_detectron2_proposals(path, records)
                self.written[name] = path
            for part in parts:
                part.unlink(missing_ok=True)
            _remove_if_empty(parts[0].parent)
            self.version = version
            rank_zero_info(
                f"ProposalWriter: proposals of {len(records)} images written to "
                + ", ".join(str(p) for p in self.written.values()) + coco
            )
            if without:
                _warn_images_without_proposals(without, len(records), pl_module)
        # a collective: the other ranks wait here for rank 0's files, then know their paths
        self.written, self.version = trainer.strategy.broadcast((self.written, self.version), src=0)
