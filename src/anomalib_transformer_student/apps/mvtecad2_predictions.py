r"""``transformer-student predict-mvtecad2``: the MVTec AD 2 submission folder, checked and packed for MVTec's server.

MVTec AD 2's ``test_private`` and ``test_private_mixed`` have no ground truth; MVTec's evaluation server scores
them, and takes a folder only if MVTec's checker accepts it (the rules: :mod:`.mvtecad2_submission`). With one
checkpoint per category, this command writes, for every image of both test sets, the layout of MVTec's public
MVTec AD 2 code::

    OUTPUT/anomaly_images/<category>/<test set>/000_regular.tiff               anomaly map, float16
    OUTPUT/anomaly_images_thresholded/<category>/<test set>/000_regular.png    mask, uint8, 0 or 255

and nothing else. Maps are the model's raw maps at the image's full size (values in [0, 4], see the how-to);
masks are the raw map above the checkpoint's pixel threshold, which must come from good validation images alone
(``QuantilePostProcessor``). When all 8 categories are there, the folder is checked against MVTec's rules and
packed as ``OUTPUT.tar.gz``.

Everything that can be checked without a model is checked first: the checkpoints exist, the categories and test
sets exist with MVTec's image names and counts, no two images share a stem, every image reads as anomalib reads
it. The output folder must be new, empty, or hold nothing but that layout (a folder this command wrote): anything
else in it is refused and nothing is touched. A run that was killed is resumed by running it again: temporary
files it left are removed, test sets already complete are kept (``--overwrite`` writes them again). Files are
written through the folder's descriptor under a temporary name and renamed into place; no symbolic link is
followed.

Example:
    transformer-student predict-mvtecad2 --data-root datasets/MVTec_AD_2 --output submission \\
        --ckpt can=results/can/model.ckpt --ckpt fabric=results/fabric/model.ckpt ...
    transformer-student predict-mvtecad2 --check submission
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import mvtecad2_submission as submission
from .mvtecad2_submission import MAPS_FOLDER, MASKS_FOLDER, TEST_SETS, SubmissionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TEMPORARY = re.compile(r"^\..+\.tmp$")
OUTPUT_NAME = re.compile(r"^\d{3,}_(regular|mixed)\.(tiff|png)$")
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SubmissionInputError(ValueError):
    """Inputs that cannot make an accepted submission.

    A category, image names or counts that MVTec's server refuses, images sharing a stem, or a checkpoint
    without thresholds from good images.
    """


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
    """The images of one private test set, sorted by name (the test sets are flat folders).

    Raises:
        FileNotFoundError: The folder holds no image.
        SubmissionInputError: Two images share a stem (``000_regular.png`` and ``000_regular.jpg``): both would
            write the same map and mask.
    """
    folder = Path(data_root) / category / split
    images = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not images:
        msg = f"No image in '{folder}' (expected {', '.join(IMAGE_SUFFIXES)} files)."
        raise FileNotFoundError(msg)
    by_stem: dict[str, list[str]] = {}
    for path in images:
        by_stem.setdefault(path.stem, []).append(path.name)
    shared = [names for names in by_stem.values() if len(names) > 1]
    if shared:
        listed = "; ".join(" and ".join(names) for names in shared[:10])
        msg = (
            f"{len(shared)} stem(s) in '{folder}' name more than one image ({listed}): each would write the same "
            "map and mask. Keep one image per name; nothing was written."
        )
        raise SubmissionInputError(msg)
    return images


def check_image_names(images: Sequence[Path], category: str, split: str, count: int) -> None:
    """Check that ``images`` are MVTec's: ``000_regular`` ... (``000_mixed`` ...), ``count`` of them.

    Raises:
        SubmissionInputError: Naming the missing and unexpected names; MVTec's server would refuse the result.
    """
    expected = set(submission.image_names(split, count, ""))
    found = {path.stem for path in images}
    if found == expected:
        return
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    parts = [f"missing {len(missing)}: {', '.join(missing[:5])}" if missing else "",
             f"unexpected {len(unexpected)}: {', '.join(unexpected[:5])}" if unexpected else ""]  # fmt: skip
    msg = (
        f"'{images[0].parent}' holds {len(found)} image(s), but MVTec's checker wants {count} for {category}/{split}, "
        f"named {', '.join(sorted(expected)[:2])}, ... ({'; '.join(part for part in parts if part)}). Unpack "
        "MVTec AD 2's complete test set; nothing was written."
    )
    raise SubmissionInputError(msg)


def check_readable(images: Sequence[Path]) -> None:
    """Decode every image as :class:`~anomalib_transformer_student.training.data_checks.DataChecks` does.

    Raises:
        CorruptImageError, ImageTooLargeError, ClippedImageError: Naming every offending file.
    """
    from ..training import data_checks

    checks = data_checks.check_images([str(path) for path in images], "Checking test images")
    corrupt = [f"{check.path} ({check.error})" for check in checks if check.error is not None]
    if corrupt:
        error = data_checks.ImageTooLargeError if any(check.too_large for check in checks) else None
        msg = f"{len(corrupt)} test image(s) cannot be read:\n{data_checks._listing(corrupt)}\nReplace them."
        raise (error or data_checks.CorruptImageError)(msg)
    clipped = [check for check in checks if check.clipped]
    if clipped:
        raise data_checks.ClippedImageError(data_checks.clipped_message(clipped, "of the private test sets"))


class SubmissionWriter:
    """Writes maps and masks into a submission folder through directory descriptors; never follows a link.

    The folder is this command's if it is new, empty, or holds nothing but the submission layout (the two
    folders, the categories, the test sets, map and mask files); anything else in it is refused before anything
    is touched. Temporary files that a killed run left in the test-set folders are removed.

    Args:
        output: The submission folder (created if missing).
        categories: The categories the layout may hold (default: MVTec AD 2's 8).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder, SubmissionWriter(Path(folder) / "out") as writer:
        ...     path = writer.write_mask("sheet_metal", "test_private", "000_regular", np.zeros((2, 3), bool))
        ...     path.relative_to(writer.output).as_posix()
        'anomaly_images_thresholded/sheet_metal/test_private/000_regular.png'
    """

    def __init__(self, output: Path, categories: Sequence[str] | None = None) -> None:
        self.output = Path(output)
        self.categories = tuple(submission.CATEGORIES if categories is None else categories)
        self._folders: dict[tuple[str, ...], int] = {}
        self._root = self._open_root()
        try:
            self.removed = self._claim()
        except BaseException:
            self.close()
            raise

    def _open_root(self) -> int:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.output)
        try:
            return os.open(self.output, _DIRECTORY_FLAGS)
        except OSError as error:
            kind = "a symbolic link" if self.output.is_symlink() else "not a folder"
            msg = f"--output '{self.output}' is {kind}; give a real folder (links are never followed)."
            raise FileExistsError(msg) from error

    def _claim(self) -> list[Path]:
        """Check that the folder holds only the layout; remove temporary leftovers; return what was removed."""
        foreign: list[str] = []
        leftovers: list[tuple[int, str, Path]] = []
        allowed = {(): {MAPS_FOLDER, MASKS_FOLDER}, (MAPS_FOLDER,): set(self.categories)}
        allowed[(MASKS_FOLDER,)] = set(self.categories)  # and, two levels down, the test sets

        def walk(descriptor: int, parts: tuple[str, ...]) -> None:
            with os.scandir(descriptor) as entries:
                listed = sorted(entries, key=lambda entry: entry.name)
            for entry in listed:
                path = self.output.joinpath(*parts, entry.name)
                is_folder = entry.is_dir(follow_symlinks=False)
                if is_folder and entry.name in allowed.get(parts, TEST_SETS if len(parts) == 2 else ()):
                    walk(self._folder((*parts, entry.name)), (*parts, entry.name))
                elif len(parts) == 3 and entry.is_file(follow_symlinks=False) and TEMPORARY.match(entry.name):
                    leftovers.append((descriptor, entry.name, path))
                elif len(parts) == 3 and entry.is_file(follow_symlinks=False) and OUTPUT_NAME.match(entry.name):
                    continue
                else:
                    foreign.append(str(path) + ("/" if is_folder else ""))

        walk(self._root, ())
        if foreign:
            listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            msg = (
                f"--output '{self.output}' holds what is not part of an MVTec AD 2 submission ({listed}); "
                "predict-mvtecad2 writes only into a new or empty folder, or one that holds nothing but "
                "anomaly_images/ and anomaly_images_thresholded/ with their categories, test sets, maps and masks. "
                "Choose another --output; nothing was changed."
            )
            raise FileExistsError(msg)
        for descriptor, name, _ in leftovers:
            os.unlink(name, dir_fd=descriptor)
        return [path for _, _, path in leftovers]

    def _folder(self, parts: tuple[str, ...]) -> int:
        """The descriptor of ``output/<parts>``, each component created if missing and opened without following."""
        if parts in self._folders:
            return self._folders[parts]
        parent = self._folder(parts[:-1]) if len(parts) > 1 else self._root
        with contextlib.suppress(FileExistsError):
            os.mkdir(parts[-1], mode=0o755, dir_fd=parent)
        try:
            descriptor = os.open(parts[-1], _DIRECTORY_FLAGS, dir_fd=parent)
        except OSError as error:
            path = self.output.joinpath(*parts)
            msg = f"'{path}' is not a folder (or is a symbolic link); remove it or choose another --output."
            raise FileExistsError(msg) from error
        self._folders[parts] = descriptor
        return descriptor

    def close(self) -> None:
        """Close every descriptor."""
        for descriptor in [*self._folders.values(), self._root]:
            os.close(descriptor)
        self._folders.clear()

    def __enter__(self) -> SubmissionWriter:
        return self

    def __exit__(self, *_exception: object) -> None:
        self.close()

    def finished(self, category: str, split: str, stems: Sequence[str]) -> bool:
        """Whether both the maps and the masks of ``stems`` are all written in ``category/split``."""
        for top, extension in submission.EXTENSIONS.items():
            descriptor = self._folder((top, category, split))
            for stem in stems:
                try:
                    if not stat.S_ISREG(os.stat(stem + extension, dir_fd=descriptor, follow_symlinks=False).st_mode):
                        return False
                except FileNotFoundError:
                    return False
        return True

    def _write(self, parts: tuple[str, ...], name: str, data: bytes) -> Path:
        """Write ``data`` to a new temporary file in the folder, then rename it to ``name``, by descriptor."""
        descriptor = self._folder(parts)
        temporary = f".{name}.{secrets.token_hex(4)}.tmp"
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=descriptor)  # fmt: skip
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            os.replace(temporary, name, src_dir_fd=descriptor, dst_dir_fd=descriptor)  # a link at ``name`` is replaced
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=descriptor)
            raise
        return self.output.joinpath(*parts, name)

    def write_map(self, category: str, split: str, stem: str, anomaly_map: np.ndarray) -> Path:
        """Write ``anomaly_map`` (H, W) as a float16 TIFF, the precision MVTec's checker demands.

        Raises:
            ValueError: A value float16 cannot hold (NaN, infinite, or beyond 65504); nothing is written.
        """
        import tifffile

        values = np.asarray(anomaly_map, dtype=np.float32)
        with np.errstate(over="ignore"):
            converted = values.astype(np.float16)
        if not np.isfinite(converted).all():
            largest = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else float("nan")
            msg = (
                f"The anomaly map of {category}/{split}/{stem} holds values that float16, the precision MVTec's "
                f"server demands, cannot hold (NaN, infinite or beyond 65504; largest finite {largest:.4g}). The "
                "method's maps lie in [0, 4], so the checkpoint or its teacher computed non-finite features: test it "
                "with anomalib. Nothing was written for this image; the images before it are kept."
            )
            raise ValueError(msg)
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, converted)
        return self._write((MAPS_FOLDER, category, split), f"{stem}.tiff", buffer.getvalue())

    def write_mask(self, category: str, split: str, stem: str, mask: np.ndarray) -> Path:
        """Write the boolean ``mask`` (H, W) as a PNG of 0 and 255."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), mode="L").save(buffer, "PNG")
        return self._write((MASKS_FOLDER, category, split), f"{stem}.png", buffer.getvalue())


@dataclass
class BuildResult:
    """What a build did: files written, test sets kept from an earlier run, temporary leftovers removed."""

    written: list[Path] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)


def load_for_masks(checkpoint: Path) -> tuple[object, float]:
    """The model of ``checkpoint`` (raw maps, no post-processing) and its pixel threshold from good images.

    Raises:
        CheckpointLoadError: The file is not a loadable checkpoint.
        SubmissionInputError: The checkpoint's pixel threshold is not a quantile of good validation pixels
            (``QuantilePostProcessor``), or was never set.
    """
    from ..model.post_processing import QuantilePostProcessor
    from .checkpoints import load_model

    # Without quantiles of its own, this post-processor shows whether the checkpoint carried them.
    probe = QuantilePostProcessor(image_quantile=None, pixel_quantile=None)
    model = load_model(checkpoint, map_location="cpu", post_processor=probe, feature_cache=False).eval()
    threshold = float(model.post_processor.pixel_threshold)
    if model.post_processor.pixel_quantile is None or not np.isfinite(threshold):
        msg = (
            f"Checkpoint '{checkpoint}' has no pixel threshold from good validation images (it was not validated with "
            "a QuantilePostProcessor with a pixel_quantile), which MVTec AD 2's SegF1 needs: train with "
            "configs/mvtecad2.yaml, or validate it again with QuantilePostProcessor (docs/how-to/mvtecad2.md)."
        )
        raise SubmissionInputError(msg)
    model.post_processor = None  # raw maps: anomalib's normalisation clips them to [0, 1]
    return model, threshold


def parse_checkpoints(entries: Sequence[str], category: str | None = None) -> dict[str, Path]:
    """``CATEGORY=PATH`` entries (or one ``PATH`` with ``category``) as a dict, each category one of the 8.

    Raises:
        ValueError: A malformed entry, a category given twice.
        SubmissionInputError: A category that MVTec AD 2 does not have.
        FileNotFoundError: A checkpoint that does not exist.

    Example:
        >>> parse_checkpoints(["can=a.ckpt"])
        Traceback (most recent call last):
        ...
        FileNotFoundError: Checkpoint not found for category 'can': 'a.ckpt'.
    """
    if category is not None:
        if len(entries) != 1:
            msg = f"--category {category} takes one --ckpt PATH; for several categories give --ckpt CATEGORY=PATH each."
            raise ValueError(msg)
        pairs = [(category, entries[0])]
    else:
        pairs = []
        for entry in entries:
            name, separator, path = entry.partition("=")
            if not separator or not name or not path:
                msg = f"--ckpt expects CATEGORY=PATH (or one PATH with --category), got '{entry}'."
                raise ValueError(msg)
            pairs.append((name, path))
    parsed: dict[str, Path] = {}
    for name, path in pairs:
        if name not in submission.CATEGORIES:
            msg = f"'{name}' is not an MVTec AD 2 category; MVTec's server takes {', '.join(submission.CATEGORIES)}."
            raise SubmissionInputError(msg)
        if name in parsed:
            msg = f"Category '{name}' is given twice (--ckpt); give one checkpoint per category."
            raise ValueError(msg)
        if not Path(path).is_file():
            msg = f"Checkpoint not found for category '{name}': '{path}'."
            raise FileNotFoundError(msg)
        parsed[name] = Path(path)
    return parsed


def build_submission(
    checkpoints: Mapping[str, Path],
    data_root: Path,
    output: Path,
    test_sets: Sequence[str] = TEST_SETS,
    counts: Mapping[str, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Write the maps and masks of ``test_sets`` of each category into ``output`` with its checkpoint.

    Every input is checked before a model loads (see the module's notes); test sets already complete in
    ``output`` are kept unless ``overwrite``.

    Args:
        checkpoints: Category -> checkpoint trained on it.
        data_root: MVTec AD 2's root (holds ``can/``, ...).
        output: The submission folder.
        test_sets: The private test sets to write.
        counts: Images per test set of each category; default MVTec's (:data:`.mvtecad2_submission.IMAGE_COUNTS`).
        overwrite: Write test sets again that are already complete.
        progress: Show progress bars.
    """
    import torch
    from anomalib.data.utils import read_image
    from tqdm import tqdm

    counts = dict(submission.IMAGE_COUNTS if counts is None else counts)
    images: dict[tuple[str, str], list[Path]] = {}
    for category in checkpoints:
        check_mvtecad2_folders(data_root, category, test_sets)
        for split in test_sets:
            images[category, split] = private_test_images(data_root, category, split)
            check_image_names(images[category, split], category, split, counts[category])
    check_readable([path for paths in images.values() for path in paths])

    result = BuildResult()
    with SubmissionWriter(output, tuple(counts)) as writer:
        result.removed = writer.removed
        loaded: tuple[Path, object, float] | None = None
        for category, checkpoint in checkpoints.items():
            work = []
            for split in test_sets:
                paths = images[category, split]
                if not overwrite and writer.finished(category, split, [path.stem for path in paths]):
                    result.kept.append(f"{category}/{split}")
                else:
                    work += [(split, path) for path in paths]
            if not work:
                continue
            if loaded is None or loaded[0] != Path(checkpoint).resolve():
                loaded = (Path(checkpoint).resolve(), *load_for_masks(checkpoint))
            _, model, threshold = loaded
            for split, path in tqdm(work, desc=f"predict-mvtecad2 {category}", unit="image", disable=not progress):
                image = read_image(path, as_tensor=True)
                with torch.no_grad():
                    anomaly_map = model(image[None]).anomaly_map.squeeze().float().cpu().numpy()
                if anomaly_map.shape != tuple(image.shape[-2:]):
                    msg = f"The map of '{path}' is {anomaly_map.shape}, not the image's {tuple(image.shape[-2:])}."
                    raise RuntimeError(msg)
                result.written += [writer.write_map(category, split, path.stem, anomaly_map),
                                   writer.write_mask(category, split, path.stem, anomaly_map > threshold)]  # fmt: skip
    return result


def check_and_pack(output: Path, pack: bool = True, archive: Path | None = None, progress: bool = True) -> Path | None:
    """Check ``output`` against MVTec's rules; pack it when they hold and ``pack``; return the archive.

    Raises:
        SubmissionError: Listing every problem with its rule.
    """
    problems = submission.check_submission(output, progress=progress)
    if problems:
        raise SubmissionError(submission.describe(problems, Path(output)))
    return submission.pack_submission(output, archive, progress=progress) if pack else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the predict-mvtecad2 command."""
    parser.add_argument(
        "--ckpt", action="append", metavar="CATEGORY=PATH",
        help="A checkpoint and the category it was trained on; repeat for every category (or one PATH with "
        "--category).",
    )  # fmt: skip
    parser.add_argument("--data-root", type=Path, help="MVTec AD 2's root (holds can/, fabric/, ...).")
    parser.add_argument("--category", help="The category of a single --ckpt PATH, e.g. sheet_metal.")
    parser.add_argument(
        "--output", type=Path, default=Path("submission"),
        help="The submission folder: new, empty, or one this command wrote (categories are added to it). "
        "Default: %(default)s.",
    )  # fmt: skip
    parser.add_argument(
        "--test-sets", nargs="+", choices=TEST_SETS, default=list(TEST_SETS),
        help="Test sets to predict. Default: both (a submission needs both).",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="Write test sets again that are already complete.")
    parser.add_argument(
        "--check", type=Path, metavar="SUBMISSION",
        help="Only check SUBMISSION against MVTec's rules (and pack it when they hold); no prediction.",
    )  # fmt: skip
    parser.add_argument("--no-pack", action="store_true", help="Do not write the .tar.gz when every rule holds.")
    parser.add_argument(
        "--archive", type=Path, help="Where the .tar.gz goes. Default: SUBMISSION.tar.gz beside the folder."
    )


def run(args: argparse.Namespace) -> int:
    """Check, or build, check and pack; print what was done; return the exit code."""
    if args.check is not None:
        if args.ckpt or args.data_root or args.category:
            msg = "--check SUBMISSION only checks a folder: drop --ckpt, --data-root and --category."
            raise ValueError(msg)
        archive = check_and_pack(args.check, not args.no_pack, args.archive)
        print(f"'{args.check}' passes every rule of MVTec's submission checker.")
        if archive is not None:
            print(f"Packed: {archive} (upload this file)")
        return 0
    if not args.ckpt or args.data_root is None:
        msg = "predict-mvtecad2 needs --ckpt CATEGORY=PATH (one per category) and --data-root, or --check SUBMISSION."
        raise ValueError(msg)
    checkpoints = parse_checkpoints(args.ckpt, args.category)
    result = build_submission(checkpoints, args.data_root, args.output, args.test_sets, overwrite=args.overwrite)
    if result.removed:
        print(f"Removed {len(result.removed)} temporary file(s) of an interrupted run.")
    if result.kept:
        print(f"Kept (complete from an earlier run; --overwrite writes them again): {', '.join(result.kept)}")
    print(f"Written: {len(result.written) // 2} anomaly maps and masks under {args.output}")
    missing = [category for category in submission.CATEGORIES if not _complete(args.output, category)]
    if missing:
        print(
            "Not packed yet: a submission needs all 8 categories with both test sets; still to do: "
            f"{', '.join(missing)}. Run again into --output {args.output} with --ckpt CATEGORY=PATH for them."
        )
        return 0
    archive = check_and_pack(args.output, not args.no_pack, args.archive)
    print(f"'{args.output}' passes every rule of MVTec's submission checker.")
    if archive is not None:
        print(f"Packed: {archive} (upload this file)")
    return 0


def _complete(output: Path, category: str) -> bool:
    """Whether ``output`` holds every map and mask of both test sets of ``category`` (by name)."""
    count = submission.IMAGE_COUNTS[category]
    for top, extension in submission.EXTENSIONS.items():
        for split in TEST_SETS:
            folder = Path(output) / top / category / split
            names = set(submission.image_names(split, count, extension))
            if not folder.is_dir() or len(names & {path.name for path in folder.iterdir()}) != count:
                return False
    return True
