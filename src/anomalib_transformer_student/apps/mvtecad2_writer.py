"""Writing an MVTec AD 2 submission folder safely: owned by its layout, through directory descriptors, no links.

The folder belongs to ``predict-mvtecad2`` when it is new, empty, or holds nothing but the submission's layout;
no marker file is needed (MVTec's checker refuses any file beside the two folders). Every file is written under a
temporary name through its folder's descriptor (opened with ``O_NOFOLLOW``) and renamed into place relative to
that descriptor, so a link planted in the folder, or a folder swapped for a link after it was checked, is never
followed; the temporary files of a killed run are recognised by name and removed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import mvtecad2_submission as submission
from .mvtecad2_submission import MAPS_FOLDER, MASKS_FOLDER, TEST_SETS

TEMPORARY = re.compile(r"^\..+\.tmp$")
OUTPUT_NAME = re.compile(r"^\d{3,}_(regular|mixed)\.(tiff|png)$")
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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

    def _folder(self, parts: tuple[str, ...], create: bool = True) -> int:
        """The descriptor of ``output/<parts>``, opened without following links; missing components are created.

        Raises:
            FileNotFoundError: A component is missing and ``create`` is false.
        """
        if parts in self._folders:
            return self._folders[parts]
        parent = self._folder(parts[:-1], create) if len(parts) > 1 else self._root
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(parts[-1], mode=0o755, dir_fd=parent)
        try:
            descriptor = os.open(parts[-1], _DIRECTORY_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            raise
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
        """Whether both the maps and the masks of ``stems`` are all written in ``category/split`` (creates nothing)."""
        for top, extension in submission.EXTENSIONS.items():
            try:
                descriptor = self._folder((top, category, split), create=False)
            except FileNotFoundError:
                return False
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


__all__ = ["SubmissionWriter"]
