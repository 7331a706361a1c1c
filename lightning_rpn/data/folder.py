"""A folder of images without annotations, for prediction."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import features
from rich.progress import track
from torch.utils.data import Dataset

from lightning_rpn.data.annotated import PROGRESS_MIN_ITEMS
from lightning_rpn.data.image_io import load_rgb_image, verify_image
from lightning_rpn.data.problems import BadAnnotationPolicy, DataError, Problem, ProblemLog, check_policy
from lightning_rpn.data.sample import DetectionSample

__all__ = ["ImageFolder", "IMAGE_SUFFIXES"]

_CODEC_SUFFIXES = {"webp": (".webp",), "jpg_2000": (".jp2", ".j2k")}
"""Formats PIL reads only when built with their codec (its wheels are): listed only then."""

IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".npy",
    *(suffix for codec, suffixes in _CODEC_SUFFIXES.items() if features.check(codec) for suffix in suffixes),
)
"""What :func:`~lightning_rpn.data.image_io.load_rgb_image` reads (``.npy``: uint8 arrays; PPM / PGM: the
uncompressed formats very large images are read by window from; ``.jfif``: JPEGs as browsers save them)."""


def _warn_about_subfolder_images(root: Path, subfolders: list[Path]) -> None:
    """Warn that the images in ``subfolders`` (one level down) are not predicted, counting them."""
    found = {folder.name: sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                              and not p.name.startswith("."))
             for folder in sorted(subfolders)}
    found = {name: count for name, count in found.items() if count}
    if found:
        listed = ", ".join(f"{name}/ ({count})" for name, count in list(found.items())[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        warnings.warn(f"ImageFolder {root}: {sum(found.values())} image files in subfolders ({listed}{more}) are not "
                      "read: a folder's images are those directly in it (name a subfolder to predict it)",
                      stacklevel=3)


class ImageFolder(Dataset):
    """Every image file directly under ``root`` (sorted by name); ids are the file names.

    Hidden files (names starting with ``.``) are left out: macOS writes a ``._x.jpg`` resource
    fork beside ``x.jpg`` on foreign disks and in archives, and it is no image. Images in
    subfolders are not read, and a warning counts them (name a subfolder to predict it). A link
    with an image suffix whose target is missing is listed, and so unreadable (below).

    An unreadable file (empty, corrupt, truncated) follows ``on_bad_annotation``, as the images of
    an annotated split do. Under ``"raise"`` loading it is a :class:`DataError` naming the file
    and the policy that skips it. Under ``"skip"`` or ``"clip"`` (an unreadable image has nothing
    to clip) every file is decoded here and the unreadable ones are left out of ``files``: a
    predict then has no entry for them, and every process of a DDP predict gets the same list (and
    so the same number of batches). Each is an ``unreadable_image`` problem in ``skipped``, carried
    by the first item's ``problems``, so that the run's data report warns about it and counts it
    once, as it does the images training skips. ``verify_images=True`` decodes every file here
    under ``"raise"`` too: the error comes before the first batch.
    """

    def __init__(
        self, root: Path | str, on_bad_annotation: BadAnnotationPolicy = "raise", verify_images: bool = False
    ) -> None:
        check_policy(on_bad_annotation, "ImageFolder")
        self.root = Path(root)
        self.on_bad_annotation: BadAnnotationPolicy = on_bad_annotation
        if not self.root.is_dir():
            raise DataError("image folder does not exist", file=str(self.root))
        entries = [p for p in self.root.iterdir() if not p.name.startswith(".")]
        self.files = sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES
                            and (p.is_file() or (p.is_symlink() and not p.exists())))
        _warn_about_subfolder_images(self.root, [p for p in entries if p.is_dir()])
        if not self.files:
            raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder", file=str(self.root))
        self.skipped: list[Problem] = []
        """The unreadable images left out (``skip`` / ``clip``), in name order."""
        if on_bad_annotation != "raise" or verify_images:
            self.files = self._readable(self.files)

    def _readable(self, files: list[Path]) -> list[Path]:
        """``files`` whose image decodes; each other one raises (``raise``) or is recorded in ``skipped``."""
        readable = []
        for path in track(files, description="Verifying images", disable=len(files) < PROGRESS_MIN_ITEMS,
                          transient=True):
            try:
                verify_image(path, image_id=path.name)
            except DataError as error:
                if self.on_bad_annotation == "raise":
                    raise self._raised(error) from error
                self.skipped.append(Problem("unreadable_image", "skipped",
                                            f"{error.reason}; left out of the prediction", str(path), path.name))
                continue
            readable.append(path)
        if not readable:
            raise DataError(f"none of the {len(files)} images can be read:\n{ProblemLog(self.skipped).summary()}",
                            file=str(self.root))
        return readable

    def _raised(self, error: DataError) -> DataError:
        """``error`` (an unreadable image under ``raise``) with the way out."""
        return DataError(f"{error.reason} (on_bad_annotation='skip', `--data.on_bad_annotation skip`, leaves "
                         "unreadable images out of the prediction)", file=error.file, image_id=error.image_id)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> DetectionSample:
        path = self.files[index]
        try:
            image = load_rgb_image(path, image_id=path.name)
        except DataError as error:
            if self.on_bad_annotation == "raise":
                raise self._raised(error) from error
            raise  # under skip / clip it was readable when the folder was listed: it changed since
        problems = list(self.skipped) if index == 0 else []
        return DetectionSample(image=image, boxes=[], image_id=path.name, source=str(path), problems=problems)
