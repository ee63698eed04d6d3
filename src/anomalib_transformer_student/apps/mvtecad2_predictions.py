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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import mvtecad2_submission as submission
from .mvtecad2_submission import TEST_SETS, SubmissionError
from .mvtecad2_writer import SubmissionWriter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


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
    corrupt = [check for check in checks if check.error is not None]
    if corrupt:
        listed = "\n".join(f"  {check.path} ({check.error})" for check in corrupt[: data_checks.MAX_LISTED])
        more = (
            f"\n  ... and {len(corrupt) - data_checks.MAX_LISTED} more" if len(corrupt) > data_checks.MAX_LISTED else ""
        )
        msg = f"{len(corrupt)} test image(s) cannot be read:\n{listed}{more}\nReplace them; nothing was written."
        too_large = any(check.too_large for check in corrupt)
        raise (data_checks.ImageTooLargeError if too_large else data_checks.CorruptImageError)(msg)
    clipped = [check for check in checks if check.clipped]
    if clipped:
        raise data_checks.ClippedImageError(data_checks.clipped_message(clipped, "of the private test sets"))


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
    missing = [part for category in submission.CATEGORIES for part in _incomplete(args.output, category)]
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


def _incomplete(output: Path, category: str) -> list[str]:
    """The test sets of ``category`` (``"can/test_private"``) whose maps or masks ``output`` does not all hold."""
    count = submission.IMAGE_COUNTS[category]
    incomplete = []
    for split in TEST_SETS:
        for top, extension in submission.EXTENSIONS.items():
            folder = Path(output) / top / category / split
            names = set(submission.image_names(split, count, extension))
            if not folder.is_dir() or len(names & {path.name for path in folder.iterdir()}) != count:
                incomplete.append(f"{category}/{split}")
                break
    return incomplete
