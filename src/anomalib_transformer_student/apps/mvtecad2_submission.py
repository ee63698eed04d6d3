"""MVTec AD 2 submissions: the rules MVTec's checker enforces, checked before uploading, and the archive it packs.

MVTec publishes ``check_submission`` (``check_and_prepare_data_for_upload.py`` with its ``utils.py``, in
``MVTecAD2_public_code_utils``); its evaluation server takes a folder only if that script accepts it. The rules,
as that code applies them (written here from them, not copied), each with the name :func:`check_submission`
reports:

``root``
    The folder holds ``anomaly_images/`` (required) and optionally ``anomaly_images_thresholded/``, and
    nothing else: any other file or folder, hidden ones included, is refused.
``categories``
    Each of the two folders holds exactly the 8 categories, as folders, and no file.
``test-sets``
    Each category holds exactly ``test_private/`` and ``test_private_mixed/``, and no file.
``file-count``
    Each test-set folder holds exactly as many entries as the category has images (:data:`IMAGE_COUNTS`),
    hidden ones counted.
``names``
    The entries are ``000_regular`` ... in ``test_private``, ``000_mixed`` ... in ``test_private_mixed`` (three
    digits at least), ending in ``.tiff`` for maps and ``.png`` for masks (``.tif`` is refused).
``maps``
    Each map, read with ``tifffile.imread``, is 2-D and of dtype float16 exactly.
``masks``
    Each mask, read with PIL, is 2-D with values 0 and 255 only.

When every rule holds, MVTec's script packs ``<folder name>.tar.gz``: every file of the folder, under
``<folder name>/`` in the archive, gzip-compressed. :func:`pack_submission` writes the same archive.
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_COUNTS: dict[str, int] = {
    "can": 321,
    "fabric": 314,
    "fruit_jelly": 255,
    "rice": 277,
    "sheet_metal": 142,
    "vial": 276,
    "wallplugs": 232,
    "walnuts": 228,
}
"""Images per private test set of each category (both test sets of a category hold this many), as MVTec's checker
counts them."""
CATEGORIES = tuple(IMAGE_COUNTS)
TEST_SETS = ("test_private", "test_private_mixed")
NAME_SUFFIXES = {"test_private": "regular", "test_private_mixed": "mixed"}
MAPS_FOLDER = "anomaly_images"
MASKS_FOLDER = "anomaly_images_thresholded"
EXTENSIONS = {MAPS_FOLDER: ".tiff", MASKS_FOLDER: ".png"}
RULES = ("root", "categories", "test-sets", "file-count", "names", "maps", "masks")
# Problems listed in one error message; the rest are counted.
MAX_LISTED = 20


class SubmissionError(ValueError):
    """A submission folder that MVTec's checker would refuse; the message lists each problem and its rule."""


@dataclass(frozen=True)
class SubmissionProblem:
    """One broken rule: its name (one of :data:`RULES`), where, and what is wrong.

    Example:
        >>> str(SubmissionProblem("root", Path("submission"), "superfluous file(s): .hidden"))
        '[root] submission: superfluous file(s): .hidden'
    """

    rule: str
    path: Path
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.path}: {self.message}"


def image_names(test_set: str, count: int, extension: str) -> list[str]:
    """The names MVTec expects in ``test_set``: ``000_regular.png`` ... for ``test_private``.

    Example:
        >>> image_names("test_private_mixed", 2, ".tiff")
        ['000_mixed.tiff', '001_mixed.tiff']
    """
    return [f"{index:03d}_{NAME_SUFFIXES[test_set]}{extension}" for index in range(count)]


def _entries(folder: Path) -> tuple[set[str], set[str]]:
    """Names of the files and of the folders in ``folder``, as the checker sees them (links followed)."""
    files, folders = set(), set()
    for entry in folder.iterdir():
        if entry.is_dir():
            folders.add(entry.name)
        elif entry.is_file():
            files.add(entry.name)
    return files, folders


def _names(names: Iterable[str], limit: int = 4) -> str:
    ordered = sorted(names)
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more


def _exactly(rule: str, folder: Path, folders: Iterable[str]) -> list[SubmissionProblem]:
    """Problems if ``folder`` holds other than exactly ``folders`` (as folders) and no file."""
    found_files, found_folders = _entries(folder)
    wanted = set(folders)
    problems = []
    if found_folders - wanted:
        problems.append(SubmissionProblem(rule, folder, f"superfluous folder(s): {_names(found_folders - wanted)}"))
    if wanted - found_folders:
        problems.append(SubmissionProblem(rule, folder, f"missing folder(s): {_names(wanted - found_folders)}"))
    if found_files:
        problems.append(SubmissionProblem(rule, folder, f"superfluous file(s): {_names(found_files)}"))
    return problems


def _check_test_set(folder: Path, test_set: str, count: int, extension: str) -> tuple[list[SubmissionProblem], list]:
    """Count and names of one test-set folder; the paths whose content is to be read."""
    entries = list(folder.iterdir())
    problems = []
    if len(entries) != count:
        problems.append(SubmissionProblem("file-count", folder, f"expected {count} entries, found {len(entries)}"))
    found_files, found_folders = _entries(folder)
    expected = set(image_names(test_set, count, extension))
    odd = {entry.name for entry in entries} - expected
    missing = expected - found_files
    if odd:
        problems.append(
            SubmissionProblem(
                "names",
                folder,
                f"unexpected entries: {_names(odd)} (expected {_names(expected, 2)}, all ending in {extension})",
            )
        )
    if missing:
        problems.append(SubmissionProblem("names", folder, f"missing file(s): {_names(missing)}"))
    del found_folders
    return problems, [folder / name for name in sorted(expected & found_files)]


def _check_map(path: Path) -> SubmissionProblem | None:
    import tifffile

    try:
        values = tifffile.imread(path)
    except Exception as error:  # the checker would stop on it: report, do not raise
        return SubmissionProblem("maps", path, f"not a readable TIFF ({type(error).__name__}: {error})")
    if values.ndim != 2:
        return SubmissionProblem("maps", path, f"not single-channel: shape {values.shape}")
    if values.dtype != np.float16:
        return SubmissionProblem("maps", path, f"dtype {values.dtype}, not float16")
    return None


def _check_mask(path: Path) -> SubmissionProblem | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            values = np.asarray(image)
    except Exception as error:  # the checker would stop on it: report, do not raise
        return SubmissionProblem("masks", path, f"not a readable image ({type(error).__name__}: {error})")
    if values.ndim != 2:
        return SubmissionProblem("masks", path, f"not single-channel: shape {values.shape}")
    odd = np.setdiff1d(np.unique(values), [0, 255])
    if odd.size:
        return SubmissionProblem("masks", path, f"values other than 0 and 255: {odd[:4].tolist()}")
    return None


def check_submission(
    folder: str | os.PathLike[str],
    counts: Mapping[str, int] | None = None,
    progress: bool = False,
) -> list[SubmissionProblem]:
    """Every rule of MVTec's checker that ``folder`` breaks (see the module's notes); empty when it passes.

    Unlike MVTec's script, which stops at the first problem, every problem is listed.

    Args:
        folder: The submission folder (holds ``anomaly_images/``).
        counts: Images per test set of each category; default :data:`IMAGE_COUNTS` (MVTec's).
        progress: Show a progress bar while the maps and masks are read.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     (Path(root) / "notes.txt").write_text("x")
        ...     [problem.rule for problem in check_submission(root)]
        1
        ['root', 'root']
    """
    counts = dict(IMAGE_COUNTS if counts is None else counts)
    root = Path(folder)
    if not root.is_dir():
        return [SubmissionProblem("root", root, "not a folder")]
    wanted = [MAPS_FOLDER] + ([MASKS_FOLDER] if (root / MASKS_FOLDER).is_dir() else [])
    problems = _exactly("root", root, wanted)
    to_read: list[tuple[str, Path]] = []
    for top in wanted:
        if not (root / top).is_dir():
            continue
        problems += _exactly("categories", root / top, counts)
        for category in counts:
            if not (root / top / category).is_dir():
                continue
            problems += _exactly("test-sets", root / top / category, TEST_SETS)
            for test_set in TEST_SETS:
                if (root / top / category / test_set).is_dir():
                    found, paths = _check_test_set(
                        root / top / category / test_set, test_set, counts[category], EXTENSIONS[top]
                    )
                    problems += found
                    to_read += [(top, path) for path in paths]
    problems += _check_contents(to_read, progress)
    return problems


def _check_contents(paths: list[tuple[str, Path]], progress: bool) -> list[SubmissionProblem]:
    from tqdm import tqdm

    def check(item: tuple[str, Path]) -> SubmissionProblem | None:
        top, path = item
        return _check_map(path) if top == MAPS_FOLDER else _check_mask(path)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = tqdm(pool.map(check, paths), total=len(paths), desc="Checking maps and masks", unit="file",
                       disable=not progress or not paths)  # fmt: skip
        return [problem for problem in results if problem is not None]


def describe(problems: list[SubmissionProblem], folder: Path) -> str:
    """One message for :class:`SubmissionError`: how many problems, the rules they break, the first ones."""
    rules = sorted({problem.rule for problem in problems}, key=RULES.index)
    shown = "\n".join(f"  {problem}" for problem in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return (
        f"'{folder}' has {len(problems)} problem(s) with MVTec's submission rules ({', '.join(rules)}); MVTec's "
        f"server would refuse it:\n{shown}{more}"
    )


def pack_submission(folder: str | os.PathLike[str], archive: str | os.PathLike[str] | None = None,
                    progress: bool = True) -> Path:  # fmt: skip
    """Pack ``folder`` as MVTec's script does: ``<name>.tar.gz`` with every file under ``<name>/``.

    The archive goes beside the folder unless ``archive`` says where (never inside it: the root rule would
    break). It is written under a temporary name and linked into place, so that a file already at the archive's
    path, which may not be this package's, is never replaced; links are refused, not packed.

    Raises:
        SubmissionError: ``archive`` lies inside ``folder``, a file is already at its path, or ``folder`` holds a
            symbolic link.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     (Path(root) / "submission" / "anomaly_images").mkdir(parents=True)
        ...     (Path(root) / "submission" / "anomaly_images" / "a.txt").write_text("x")
        ...     path = pack_submission(Path(root) / "submission", progress=False)
        ...     path.name, tarfile.open(path).getnames()
        1
        ('submission.tar.gz', ['submission/anomaly_images/a.txt'])
    """
    from tqdm import tqdm

    root = Path(folder).resolve()
    target = (root.parent / f"{root.name}.tar.gz") if archive is None else Path(archive).resolve()
    if target.is_relative_to(root):
        msg = f"The archive '{target}' would lie inside the submission '{root}'; put it elsewhere."
        raise SubmissionError(msg)
    files = []
    for base, folders, names in os.walk(root):
        folders.sort()
        for name in [*folders, *sorted(names)]:
            path = Path(base, name)
            if stat.S_ISLNK(os.lstat(path).st_mode):
                msg = f"'{path}' is a symbolic link; a submission holds plain files only (links are not packed)."
                raise SubmissionError(msg)
            if name in names:
                files.append(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
            for path in tqdm(files, desc="Packing", unit="file", disable=not progress):
                tar.add(path, arcname=Path(root.name, path.relative_to(root)).as_posix(), recursive=False)
        os.link(temporary, target)
    except FileExistsError:
        msg = f"'{target}' already exists; remove it yourself, or pack to another path (--archive PATH)."
        raise SubmissionError(msg) from None
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


__all__ = [
    "CATEGORIES",
    "IMAGE_COUNTS",
    "RULES",
    "TEST_SETS",
    "SubmissionError",
    "SubmissionProblem",
    "check_submission",
    "image_names",
    "pack_submission",
]
