"""Checks of the images and masks a run is about to read, made before any work is spent on them.

anomalib reads an image only when a batch needs it, so a truncated file in the training folder
stops a run hours in, with ``OSError: image file is truncated`` and no file name. The
:class:`DataChecks` callback decodes every image (and mask) of the datasets a stage uses when
the stage is set up, and stops at once with an error that lists every offending file and the
way out, or, with ``skip_corrupt_images``, drops the unreadable ones with one warning that
lists them.

What it checks, and what it does:

- unreadable images and masks (truncated, corrupt, not an image): :class:`CorruptImageError`,
  or skipped with a warning;
- images over PIL's pixel limit (twice ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 MP by default), which
  anomalib's reader refuses though they are not corrupt: :class:`ImageTooLargeError`, never skipped;
- an empty training set: :class:`EmptyTrainingSetError`;
- masks whose size differs from their image's: :class:`MaskSizeError`, naming both files;
- single-channel images of more than 8 bits (modes ``I;16``, ``I``, ``F``: 16-bit, 32-bit integer and float
  grayscale) whose values do not survive anomalib's 8-bit conversion (``convert("RGB")`` clips to 0..255 and
  truncates fractions, so a 12-bit PNG turns white and a float image in [0, 1] black):
  :class:`ClippedImageError`, naming each file, its mode and its value range;
- with tiling, images that would be cut into more tiles than the tiling allows: the tiling's
  ``ValueError``, naming a ``tile_size`` that works;
- images so elongated or small that their content is thinner than one patch after square
  padding (or tiling) and resizing, and training images of mixed sizes: a warning, since they
  are handled correctly but poorly.

Grayscale, palette, RGBA and 16-bit RGB files need nothing: anomalib converts them to 8-bit RGB.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from anomalib.data import AnomalibDataset, PredictDataset
from anomalib.data.utils import LabelName
from lightning.pytorch import Callback
from PIL import Image
from tqdm import tqdm

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from pandas import DataFrame

logger = logging.getLogger(__name__)

# Single-channel modes of more than 8 bits, which ``Image.convert("RGB")`` clips to 0..255 (``F`` also truncated).
WIDE_GRAYSCALE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Above this many files the checks show a progress bar.
PROGRESS_THRESHOLD = 500
# At most this many file names in an error or warning line; the rest are counted.
MAX_LISTED = 20


class TileCounter(Protocol):
    """The tiling as the checks see it (``model.tiling.Tiling``)."""

    tile_size: int

    def fits(self, height: int, width: int) -> bool:
        """Whether an image of this size fits in one tile (and so is not tiled)."""

    def layout(self, height: int, width: int) -> object | None:
        """The tiles of an image of this size (``None`` if it fits in one); raises ``ValueError`` if too many."""


class DataCheckError(ValueError):
    """Base of the errors :class:`DataChecks` raises: the data cannot be used as it is."""


class CorruptImageError(DataCheckError):
    """Images or masks that cannot be decoded."""


class ImageTooLargeError(DataCheckError):
    """Images over PIL's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``), which anomalib's reader refuses."""


class EmptyTrainingSetError(DataCheckError):
    """No training image was found (or every one was skipped)."""


class MaskSizeError(DataCheckError):
    """Masks whose size differs from the size of their image."""


class ClippedImageError(DataCheckError):
    """Wide grayscale images (``I;16``, ``I``, ``F``) whose values anomalib's 8-bit reader would clip or truncate."""


@dataclass(frozen=True)
class ImageCheck:
    """What decoding one file told.

    Args:
        path: The file.
        size: ``(width, height)``, or ``None`` if the file could not be decoded.
        error: Why the file could not be decoded (``"OSError: image file is truncated"``), else ``None``.
        clipped: A wide grayscale image whose values an 8-bit conversion changes (outside 0..255, fractional
            or not finite).
        too_large: Over PIL's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``): not corrupt, but PIL refuses it.
        mode: PIL's mode of the file (``"RGB"``, ``"I;16"``, ``"F"``, ...), ``None`` if it could not be decoded.
        value_range: ``(min, max)`` of a wide grayscale image, else ``None``.
    """

    path: str
    size: tuple[int, int] | None
    error: str | None = None
    clipped: bool = False
    too_large: bool = False
    mode: str | None = None
    value_range: tuple[float, float] | None = None


def _changed_by_8_bits(image: Image.Image) -> tuple[bool, tuple[float, float]]:
    """Whether anomalib's 8-bit conversion changes a wide grayscale image's values, and their range."""
    values = np.asarray(image)
    finite = np.isfinite(values)
    shown = values[finite] if finite.any() else np.zeros(1)
    value_range = (float(shown.min()), float(shown.max()))
    changed = not finite.all() or value_range[0] < 0 or value_range[1] > 255
    if not changed and values.dtype.kind == "f":
        changed = bool((values != np.floor(values)).any())
    return changed, value_range


def check_image(path: str | os.PathLike[str]) -> ImageCheck:
    """Decode ``path`` completely (which is what finds truncation) and report what was found.

    Example:
        >>> check_image("missing.png").error
        "FileNotFoundError: [Errno 2] No such file or directory: 'missing.png'"
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in WIDE_GRAYSCALE_MODES:
                return ImageCheck(str(path), image.size, mode=image.mode)
            clipped, value_range = _changed_by_8_bits(image)
            return ImageCheck(str(path), image.size, clipped=clipped, mode=image.mode, value_range=value_range)
    except Image.DecompressionBombError as error:
        return ImageCheck(str(path), None, error=f"{type(error).__name__}: {error}", too_large=True)
    except Exception as error:  # every reason a file cannot be read is reported, not raised
        return ImageCheck(str(path), None, error=f"{type(error).__name__}: {error}")


def check_images(paths: Sequence[str], description: str = "Checking images") -> list[ImageCheck]:
    """Check many files in a thread pool (decoding releases the GIL), with a progress bar when there are many."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(check_image, paths)
        return list(tqdm(results, total=len(paths), desc=description, disable=len(paths) < PROGRESS_THRESHOLD))


def _listing(lines: Sequence[str]) -> str:
    shown = "\n".join(f"  {line}" for line in lines[:MAX_LISTED])
    more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    return shown + more


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


class DataChecks(Callback):
    """Check every image and mask of the datasets a stage will read, when the stage is set up.

    Datasets of the trainer's datamodule are checked in ``setup`` (for ``fit``: the training,
    validation and test sets, so that ``anomalib train`` cannot fail at its test after hours of
    training); dataloaders passed to the trainer directly are checked when their loop starts.
    Each dataset is checked once. Datasets are anomalib's: a ``samples`` DataFrame with
    ``image_path`` and ``mask_path`` columns, or a list ``image_filenames`` (``PredictDataset``).

    ``TransformerStudent`` adds its own instance, with its input size and tiling; Lightning puts it in the
    place of one given to the trainer, and it adopts that one's ``skip_corrupt_images=True``.

    Args:
        skip_corrupt_images: Drop images (and test images with masks) that cannot be decoded,
            with one warning listing them, instead of raising :class:`CorruptImageError`.
        input_size: Side of the model's square input, for the thin-image warning.
        patch_size: The teacher's patch size, for the thin-image warning.
        tiling: The model's tiling, if any: every image's tiles are counted (too many raise its
            ``ValueError``), and tiled images are checked for thinness at the tile's scale.

    Example:
        >>> from anomalib.engine import Engine
        >>> engine = Engine(callbacks=[DataChecks(skip_corrupt_images=True)])
    """

    def __init__(
        self,
        skip_corrupt_images: bool = False,
        input_size: int | None = None,
        patch_size: int | None = None,
        tiling: TileCounter | None = None,
    ) -> None:
        self.skip_corrupt_images = skip_corrupt_images
        self.input_size = input_size
        self.patch_size = patch_size
        self.tiling = tiling
        self._checked: set[int] = set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the datamodule's datasets that ``stage`` uses, before any dataloader exists.

        Raises:
            EmptyTrainingSetError: At ``fit``, if the training set is empty or every image was skipped.
        """
        del pl_module
        datamodule = trainer.datamodule
        if datamodule is None:
            return
        # anomalib's datamodules predict on their test set.
        splits = {"fit": ("train", "val", "test"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage, ()):
            dataset = getattr(datamodule, f"{split}_data", None)
            if dataset is None:
                continue
            if split == "train" and len(dataset) == 0:
                raise EmptyTrainingSetError(_empty_message(datamodule, "is empty: no image was found"))
            self.check_dataset(dataset, split)
            if split == "train" and len(dataset) == 0:
                raise EmptyTrainingSetError(_empty_message(datamodule, "is empty once unreadable images are skipped"))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check a training dataloader given to the trainer directly."""
        del pl_module
        self._check_loaders(trainer.train_dataloader, "train")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check validation dataloaders given to the trainer directly."""
        del pl_module
        self._check_loaders(trainer.val_dataloaders, "val")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check test dataloaders given to the trainer directly."""
        del pl_module
        self._check_loaders(trainer.test_dataloaders, "test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check predict dataloaders given to the trainer directly."""
        del pl_module
        self._check_loaders(trainer.predict_dataloaders, "predict")

    def _check_loaders(self, loaders: object, split: str) -> None:
        for loader in _flatten(loaders):
            dataset = getattr(loader, "dataset", None)
            if dataset is not None:
                self.check_dataset(dataset, split)

    def check_dataset(self, dataset: Any, split: str) -> None:
        """Decode every image and mask of ``dataset`` and act on what is found (see the class docstring).

        Raises:
            CorruptImageError: Files that cannot be decoded, unless ``skip_corrupt_images``.
            ImageTooLargeError: Images or masks over PIL's pixel limit, whatever ``skip_corrupt_images`` says.
            MaskSizeError: Masks whose size differs from their image's.
            ClippedImageError: Wide grayscale images (``I;16``, ``I``, ``F``) that an 8-bit conversion changes.
        """
        if id(dataset) in self._checked:
            return
        if isinstance(dataset, AnomalibDataset):
            image_paths = [str(path) for path in dataset.samples["image_path"]]
            mask_paths = _mask_paths(dataset.samples)
        elif isinstance(dataset, PredictDataset):
            image_paths, mask_paths = [str(path) for path in dataset.image_filenames], {}
        else:
            return
        if not image_paths:
            self._checked.add(id(dataset))
            return
        unique_masks = sorted(set(mask_paths.values()))
        checks = check_images([*image_paths, *unique_masks], f"Checking {split} images")
        images = dict(zip(image_paths, checks[: len(image_paths)], strict=True))
        masks = dict(zip(unique_masks, checks[len(image_paths) :], strict=True))

        too_large = [check.path for check in checks if check.too_large]
        if too_large:
            raise ImageTooLargeError(_too_large_message(too_large, split))
        corrupt = [check for check in checks if check.error is not None]
        if corrupt:
            lines = [f"{check.path} ({check.error})" for check in corrupt]
            if not self.skip_corrupt_images:
                msg = (
                    f"{len(corrupt)} file(s) of the {split} set cannot be read:\n{_listing(lines)}\n"
                    "Replace or delete them, or skip them: give the trainer `DataChecks(skip_corrupt_images=True)` "
                    "(on the anomalib CLI --trainer.callbacks+=anomalib_transformer_student.training.data_checks."
                    "DataChecks --trainer.callbacks.skip_corrupt_images true)."
                )
                raise CorruptImageError(msg)
            bad = {check.path for check in corrupt}
            dropped = [path for path in image_paths if path in bad or mask_paths.get(path) in bad]
            _drop(dataset, dropped)
            logger.warning(
                "Skipped %d unreadable file(s) of the %s set (skip_corrupt_images=True); %d image(s) left:\n%s",
                len(corrupt),
                split,
                len(image_paths) - len(dropped),
                _listing(lines),
            )
            image_paths = [path for path in image_paths if path not in dropped]

        clipped = [images[path] for path in image_paths if images[path].clipped]
        if clipped:
            raise ClippedImageError(clipped_message(clipped, f"of the {split} set"))

        mismatched = [
            f"image {path} is {_size(images[path].size)}, mask {mask} is {_size(masks[mask].size)}"
            for path in image_paths
            if (mask := mask_paths.get(path)) is not None and images[path].size != masks[mask].size
        ]
        if mismatched:
            msg = (
                f"{len(mismatched)} mask(s) of the {split} set differ in size from their image:\n"
                f"{_listing(mismatched)}\nA mask must have its image's width and height; resize or replace it."
            )
            raise MaskSizeError(msg)

        self._count_tiles(images[path] for path in image_paths)
        self._warn_thin_images([images[path] for path in image_paths], split)
        if split == "train":
            _warn_mixed_sizes([images[path] for path in image_paths])
        self._checked.add(id(dataset))

    def _count_tiles(self, checks: Iterable[ImageCheck]) -> None:
        """Raise the tiling's ``ValueError`` if an image would be cut into more tiles than it allows."""
        if self.tiling is None:
            return
        for size in {check.size for check in checks}:
            assert size is not None  # unreadable files were raised or dropped before
            self.tiling.layout(size[1], size[0])

    def _tiled(self, size: tuple[int, int]) -> bool:
        return self.tiling is not None and not self.tiling.fits(size[1], size[0])

    def _warn_thin_images(self, checks: Iterable[ImageCheck], split: str) -> None:
        """Warn about images whose content is thinner than one patch once padded (or tiled) and resized."""
        if self.input_size is None or self.patch_size is None:
            return
        thin = []
        for check in checks:
            assert check.size is not None  # unreadable files were raised or dropped before
            side = self.tiling.tile_size if self._tiled(check.size) else max(check.size)
            scale = self.input_size / side
            if min(check.size) * scale < self.patch_size:
                resized = (round(check.size[0] * scale), round(check.size[1] * scale))
                thin.append(f"{check.path} ({_size(check.size)} -> {_size(resized)} px)")
        if thin:
            logger.warning(
                "%d image(s) of the %s set are thinner than one %d-px patch once padded to a square and resized to "
                "%d px, so the teacher sees them as a sliver and defects in them are hard to find; crop or tile "
                "them (or raise image_size):\n%s",
                len(thin),
                split,
                self.patch_size,
                self.input_size,
                _listing(thin),
            )


def clipped_message(checks: Sequence[ImageCheck], where: str) -> str:
    """The :class:`ClippedImageError` message for ``checks``: each file with its mode and value range."""
    lines = [
        f"{check.path} (mode {check.mode}, values {check.value_range[0]:g}..{check.value_range[1]:g})"
        for check in checks
        if check.value_range is not None
    ]
    return (
        f"{len(checks)} image(s) {where} are single-channel images of more than 8 bits whose values anomalib's "
        "reader changes: it converts them to 8-bit RGB, clipping to 0..255 and truncating fractions (a 12-bit "
        f"image turns white, a float image in [0, 1] black, NaN 0):\n{_listing(lines)}\n"
        "Rescale them to 8-bit integers first, e.g. divide by 257 for full-range 16-bit data or by 16 for 12-bit "
        "data, multiply float data in [0, 1] by 255, and save as 8-bit PNG."
    )


def _too_large_message(paths: Sequence[str], split: str) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    refused = f"over {2 * limit:,} pixels (twice PIL.Image.MAX_IMAGE_PIXELS = {limit:,})" if limit else "too large"
    return (
        f"{len(paths)} file(s) of the {split} set are {refused}, which PIL, and so anomalib's reader, refuses as a "
        f"possible decompression bomb; they are not corrupt:\n{_listing(paths)}\n"
        "If you trust the files, raise the limit in the process that runs anomalib before the data is read: "
        "`import PIL.Image; PIL.Image.MAX_IMAGE_PIXELS = None` (or a number of pixels). Large images are then "
        "inspected tile by tile at full resolution with `tile_size` (--model.tiling.tile_size); without it each image "
        "is resized whole to image_size."
    )


def _empty_message(datamodule: Any, what: str) -> str:
    settings = {name: getattr(datamodule, name, None) for name in ("root", "category", "normal_dir")}
    where = ", ".join(f"{name}={value}" for name, value in settings.items() if value is not None)
    folder = Path(settings["root"] or "<root>") / str(settings["category"] or "<category>") / "train" / "good"
    return (
        f"The training set of {type(datamodule).__name__}({where}) {what}. Put nominal (defect-free) images "
        f"where the datamodule looks for them: {folder}/ for MVTecAD-style data, `normal_dir` for Folder."
    )


def _warn_mixed_sizes(checks: Sequence[ImageCheck]) -> None:
    sizes = Counter(check.size for check in checks)
    if len(sizes) > 1:
        common = ", ".join(f"{_size(size)} ({count})" for size, count in sizes.most_common(5))
        logger.warning(
            "Training images come in %d sizes (%s). anomalib resizes each training batch to its largest image "
            "before the model's square padding, which distorts the others; use images of one size or "
            "train_batch_size 1.",
            len(sizes),
            common,
        )


def _mask_paths(samples: DataFrame) -> dict[str, str]:
    """Image path -> mask path for the anomalous images of a segmentation dataset (anomalib reads no others)."""
    if samples.attrs.get("task") == "classification" or "mask_path" not in samples:
        return {}
    labels = samples["label_index"] if "label_index" in samples else [LabelName.ABNORMAL] * len(samples)
    return {
        str(image): str(mask)
        for image, mask, label in zip(samples["image_path"], samples["mask_path"], labels, strict=True)
        if isinstance(mask, str | os.PathLike) and str(mask) and label == LabelName.ABNORMAL
    }


def _drop(dataset: AnomalibDataset | PredictDataset, paths: Sequence[str]) -> None:
    """Remove ``paths`` from an anomalib dataset's ``samples`` (or ``image_filenames``)."""
    drop = set(paths)
    if isinstance(dataset, AnomalibDataset):
        samples = dataset.samples
        dataset.samples = samples[~samples["image_path"].astype(str).isin(drop)].reset_index(drop=True)
    else:
        dataset.image_filenames = [path for path in dataset.image_filenames if str(path) not in drop]


def _flatten(loaders: object) -> Iterator[object]:
    if loaders is None:
        return
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, list | tuple):
        for loader in loaders:
            yield from _flatten(loader)
    else:
        yield loaders


__all__ = [
    "ClippedImageError",
    "CorruptImageError",
    "DataCheckError",
    "DataChecks",
    "EmptyTrainingSetError",
    "ImageCheck",
    "ImageTooLargeError",
    "MaskSizeError",
    "check_image",
    "check_images",
    "clipped_message",
]
