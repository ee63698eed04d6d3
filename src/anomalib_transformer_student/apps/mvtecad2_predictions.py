r"""``transformer-student predict-mvtecad2``: full-size anomaly maps and masks for MVTec AD 2's private test sets.

MVTec AD 2's ``test_private`` and ``test_private_mixed`` have no ground truth; MVTec's evaluation server scores
them. This command writes, for each image of the chosen test sets of one category, the layout of MVTec's public
MVTec AD 2 code (``mvtec_ad_2_public_offline.py``: ``get_relative_anomaly_image_out_path``, the image's path
relative to the dataset root under ``anomaly_images/`` as ``.tiff`` and under ``anomaly_images_thresholded/``
as ``.png``)::

    OUTPUT/anomaly_images/<category>/<test set>/<image name>.tiff              anomaly map, float16 (or float32)
    OUTPUT/anomaly_images_thresholded/<category>/<test set>/<image name>.png   mask, uint8, 0 or 255

Maps are the model's raw maps at the image's full size (any size: the model tiles it), not anomalib's min-max
normalised ones, which clip; masks are the raw map above the checkpoint's pixel threshold (the threshold of
anomalib's post-processing, e.g. ``QuantilePostProcessor``'s quantile of the good validation pixels), so they
equal the ``pred_mask`` of ``anomalib predict``. Every category and test-set folder is checked before the
checkpoint is loaded, and nothing is downloaded.

Writing is safe: each file is written under a temporary name in its folder and renamed into place; folders and
files under ``OUTPUT`` that are symbolic links are refused, never followed; an ``OUTPUT`` that exists, is not
empty and was not written by this command (it holds no ``.transformer_student_predictions`` marker) is refused.

Example:
    transformer-student predict-mvtecad2 --ckpt results/.../weights/lightning/model.ckpt \\
        --data-root datasets/MVTec_AD_2 --category sheet_metal --output submission
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

TEST_SETS = ("test_private", "test_private_mixed")
MAPS_FOLDER = "anomaly_images"
MASKS_FOLDER = "anomaly_images_thresholded"
MARKER = ".transformer_student_predictions"
MapDtype = Literal["float16", "float32"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def check_mvtecad2_folders(data_root: Path, category: str, splits: Sequence[str]) -> None:
    """Check that ``data_root/category/<split>`` exists for every split, before anything is loaded or downloaded.

    anomalib's ``MVTecAD2`` datamodule downloads the whole dataset when the category folder is missing, and
    reads a missing split as an empty set.

    Raises:
        FileNotFoundError: Naming each missing folder and what ``data_root`` (or the category folder) holds.

    Example:
        >>> check_mvtecad2_folders(Path("no/such/root"), "sheet_metal", ["test_private"])
        Traceback (most recent call last):
        ...
        FileNotFoundError: No MVTec AD 2 category folder 'no/such/root/sheet_metal' ...
    """
    root = Path(data_root)
    folder = root / category
    if not folder.is_dir():
        if not root.is_dir():
            holds = f"'{root}' does not exist"
        else:
            found = sorted(path.name for path in root.iterdir() if path.is_dir())
            holds = f"'{root}' holds: {', '.join(found)}" if found else f"'{root}' holds no folder"
        msg = (
            f"No MVTec AD 2 category folder '{folder}' ({holds}). Check --data-root (the folder that "
            "holds can/, fabric/, ..., walnuts/) and the category's spelling; nothing is downloaded."
        )
        raise FileNotFoundError(msg)
    missing = [split for split in splits if not (folder / split).is_dir()]
    if missing:
        found = sorted(path.name for path in folder.iterdir() if path.is_dir())
        paths = ", ".join(f"'{folder / split}'" for split in missing)
        msg = (
            f"MVTec AD 2 folder(s) missing: {paths} ('{folder}' holds: {', '.join(found) or 'nothing'}). "
            "Unpack the complete category (train, validation, test_public, test_private, test_private_mixed)."
        )
        raise FileNotFoundError(msg)


def private_test_images(data_root: Path, category: str, split: str) -> list[Path]:
    """The images of one private test set, sorted by name (the test sets are flat folders)."""
    folder = Path(data_root) / category / split
    images = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not images:
        msg = f"No image in '{folder}' (expected {', '.join(IMAGE_SUFFIXES)} files)."
        raise FileNotFoundError(msg)
    return images


class PredictionWriter:
    """Writes maps and masks under an output folder, atomically, never through a symbolic link.

    The output folder is claimed with a marker file; a folder that exists, is not empty and lacks the marker is
    refused, so that the command never writes into (or over) someone else's files.

    Args:
        output: The output folder (created if missing).
        map_dtype: Precision of the TIFF maps, ``"float16"`` (what MVTec AD 2 submissions use, half the size)
            or ``"float32"``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     writer = PredictionWriter(Path(folder) / "out")
        ...     path = writer.write_mask(Path("sheet_metal/test_private/000_regular.png"), np.zeros((2, 3), bool))
        ...     path.relative_to(writer.output).as_posix()
        'anomaly_images_thresholded/sheet_metal/test_private/000_regular.png'
    """

    def __init__(self, output: Path, map_dtype: MapDtype = "float16") -> None:
        self.output = Path(output)
        self.map_dtype = np.dtype(map_dtype)
        self._claim()

    def _claim(self) -> None:
        if self.output.is_symlink():
            msg = f"--output '{self.output}' is a symbolic link; give a real folder (links are never followed)."
            raise FileExistsError(msg)
        if self.output.exists():
            if not self.output.is_dir():
                msg = f"--output '{self.output}' exists and is not a folder; choose another path."
                raise FileExistsError(msg)
            marker = self.output / MARKER
            if any(self.output.iterdir()) and not (marker.is_file() and not marker.is_symlink()):
                msg = (
                    f"--output '{self.output}' exists, is not empty and was not written by predict-mvtecad2 (no "
                    f"'{MARKER}' in it); choose a new or empty folder, nothing was written."
                )
                raise FileExistsError(msg)
        self.output.mkdir(parents=True, exist_ok=True)
        self._write_bytes(self.output / MARKER, b"anomaly maps and masks written by transformer-student\n")

    def _folder(self, relative: Path) -> Path:
        """Create ``output/relative`` folder by folder, refusing any component that is a link or not a folder."""
        folder = self.output
        for part in relative.parts:
            folder = folder / part
            try:
                mode = os.lstat(folder).st_mode
            except FileNotFoundError:
                folder.mkdir()
                continue
            if not stat.S_ISDIR(mode):
                kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a folder"
                msg = f"'{folder}' is {kind}; remove it or choose another --output (links are never followed)."
                raise FileExistsError(msg)
        return folder

    def _write_bytes(self, path: Path, data: bytes) -> None:
        self._write(path, lambda handle: handle.write(data))

    def _write(self, path: Path, save: Callable[[object], object]) -> None:
        """Write through ``save(handle)`` to a temporary file beside ``path``, then rename it into place."""
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                save(handle)
            os.replace(temporary, path)  # replaces a link at ``path`` itself, never its target
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _target(self, top: str, relative: Path, suffix: str) -> Path:
        relative = Path(relative)
        if relative.is_absolute() or ".." in relative.parts:
            msg = f"Expected a path relative to the dataset root, got '{relative}'."
            raise ValueError(msg)
        return self._folder(Path(top) / relative.parent) / relative.with_suffix(suffix).name

    def write_map(self, relative: Path, anomaly_map: np.ndarray) -> Path:
        """Write ``anomaly_map`` (H, W) as a TIFF of ``map_dtype`` for the image at ``relative`` (to the root)."""
        import tifffile

        values = np.asarray(anomaly_map, dtype=np.float32)
        with np.errstate(over="ignore"):
            converted = values.astype(self.map_dtype)
        if not np.isfinite(converted).all():
            msg = (
                f"The anomaly map of '{relative}' has values that {self.map_dtype} cannot hold (largest "
                f"{np.nanmax(np.abs(values)):.4g}); use --map-dtype float32."
            )
            raise ValueError(msg)
        path = self._target(MAPS_FOLDER, relative, ".tiff")
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, converted)
        self._write_bytes(path, buffer.getvalue())
        return path

    def write_mask(self, relative: Path, mask: np.ndarray) -> Path:
        """Write the boolean ``mask`` (H, W) as a PNG of 0 and 255 for the image at ``relative`` (to the root)."""
        from PIL import Image

        image = Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), mode="L")
        path = self._target(MASKS_FOLDER, relative, ".png")
        self._write(path, lambda handle: image.save(handle, format="PNG"))
        return path


def predict_mvtecad2(
    checkpoint: Path,
    data_root: Path,
    category: str,
    output: Path,
    test_sets: Sequence[str] = TEST_SETS,
    map_dtype: MapDtype = "float16",
    progress: bool = True,
) -> list[Path]:
    """Write full-size maps and masks of ``test_sets`` of ``category``; return the written files.

    Raises:
        FileNotFoundError: A category or test-set folder is missing (checked first), or a test set is empty.
        FileExistsError: ``output`` is not this command's, or holds a link where a folder or file goes.
        ValueError: The checkpoint has no pixel threshold.
    """
    check_mvtecad2_folders(data_root, category, test_sets)
    images = {split: private_test_images(data_root, category, split) for split in test_sets}
    writer = PredictionWriter(output, map_dtype)

    import torch
    from anomalib.data.utils import read_image
    from tqdm import tqdm

    from ..model import TransformerStudent

    model = TransformerStudent.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    threshold = float(getattr(model.post_processor, "pixel_threshold", float("nan")))
    if not np.isfinite(threshold):
        msg = (
            f"Checkpoint '{checkpoint}' has no pixel threshold (its post-processor never saw validation maps); "
            "train with validation (anomalib's default) or a QuantilePostProcessor, then predict again."
        )
        raise ValueError(msg)
    model.post_processor = None  # raw maps: anomalib's normalisation clips them to [0, 1]
    written = []
    work = [(split, path) for split, paths in images.items() for path in paths]
    for split, path in tqdm(work, desc=f"predict-mvtecad2 {category}", unit="image", disable=not progress):
        image = read_image(path, as_tensor=True)
        with torch.no_grad():
            anomaly_map = model(image[None]).anomaly_map.squeeze().float().cpu().numpy()
        if anomaly_map.shape != tuple(image.shape[-2:]):
            msg = f"The map of '{path}' is {anomaly_map.shape}, not the image's {tuple(image.shape[-2:])}."
            raise RuntimeError(msg)
        relative = Path(category) / split / path.name
        written += [writer.write_map(relative, anomaly_map), writer.write_mask(relative, anomaly_map > threshold)]
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the predict-mvtecad2 command."""
    parser.add_argument("--ckpt", type=Path, required=True, help="Checkpoint trained on the category.")
    parser.add_argument("--data-root", type=Path, required=True, help="MVTec AD 2's root (holds can/, fabric/, ...).")
    parser.add_argument("--category", required=True, help="The checkpoint's category, e.g. sheet_metal.")
    parser.add_argument(
        "--output", type=Path, default=Path("mvtecad2_predictions"),
        help="Folder for anomaly_images/ and anomaly_images_thresholded/ (new, empty, or one this command wrote).",
    )  # fmt: skip
    parser.add_argument(
        "--test-sets", nargs="+", choices=TEST_SETS, default=list(TEST_SETS),
        help="Test sets to predict. Default: both.",
    )  # fmt: skip
    parser.add_argument(
        "--map-dtype", choices=("float16", "float32"), default="float16",
        help="Precision of the TIFF anomaly maps. Default: %(default)s.",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Check the folders, predict, write; print where; return the exit code."""
    if not Path(args.ckpt).is_file():
        msg = f"Checkpoint not found: '{args.ckpt}'."
        raise FileNotFoundError(msg)
    written = predict_mvtecad2(args.ckpt, args.data_root, args.category, args.output, args.test_sets, args.map_dtype)
    print(f"Written: {len(written) // 2} anomaly maps and masks under {args.output}")
    return 0
