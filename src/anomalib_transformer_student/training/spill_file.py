"""Spill files of the teacher-feature cache: fixed-size entries on disk, one writer per file.

Layout of a fingerprint folder::

    <cache_dir>/<fingerprint[:16]>/rank0.lock   locked (flock) by the one process that writes rank0.*
    <cache_dir>/<fingerprint[:16]>/rank0.bin    entries, one fixed-size slot each
    <cache_dir>/<fingerprint[:16]>/rank0.json   index: entry key -> (slot, CRC-32)

Each process writes only a file it holds the lock of (:func:`claim_spill_name`); the others are
read only. Entries are written with plain file writes (a memory map of a sparse file kills the
process with SIGBUS on a full disk), listed in the index only after their bytes are written, and
the index is replaced atomically.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import uuid
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .dtypes import NUMPY_DTYPES

try:
    import fcntl
except ImportError:  # Windows: spill files are private to their process, see claim_spill_name
    fcntl = None

logger = logging.getLogger(__name__)

# Bump when anything that shapes the cached tokens, their keys or the file layout changes.
CACHE_FORMAT_VERSION = 2
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def claim_spill_name(folder: Path, rank: int = 0) -> tuple[str, int | None]:
    """The name of a spill file in ``folder`` that no running process writes, and the descriptor that locks it.

    Tries ``rank<rank>``, ``rank<rank>-1``, ``rank<rank>-2``, ... and keeps the first whose
    ``.lock`` file it can lock exclusively: the files of a finished run are adopted, those of a
    running one never shared. The lock lasts while the descriptor is open, and the kernel drops
    it when the process dies, even by SIGKILL. Without ``flock`` (Windows, or a filesystem that
    refuses locks) the descriptor is ``None`` and the name is unique to this process: its files
    are private and removed when the cache closes.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> (first, lock), (second, _) = claim_spill_name(folder), claim_spill_name(folder)
        >>> first, second
        ('rank0', 'rank0-1')
        >>> os.close(lock)
        >>> claim_spill_name(folder)[0]
        'rank0'
    """
    private = f"rank{rank}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if fcntl is None:
        return private, None
    number = 0
    while True:
        name = f"rank{rank}-{number}" if number else f"rank{rank}"
        descriptor = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return name, descriptor
        except BlockingIOError:
            os.close(descriptor)
        except OSError:  # e.g. ENOLCK on a network filesystem without locking
            os.close(descriptor)
            return private, None
        number += 1


def folder_bytes(folder: Path) -> int:
    """Bytes of the files in ``folder`` (files that vanish while it counts are skipped)."""
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat().st_size if entry.is_file() else 0
    return total


def _entry_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return int(np.prod(shape)) * np.dtype(NUMPY_DTYPES[dtype]).itemsize


def _read_at(file: io.FileIO, offset: int, buffer: memoryview) -> bool:
    """Fill ``buffer`` from ``offset``; ``False`` when the file ends first."""
    file.seek(offset)
    while buffer:
        count = file.readinto(buffer)
        if not count:
            return False
        buffer = buffer[count:]
    return True


def _write_at(file: io.FileIO, offset: int, data: memoryview) -> None:
    """Write all of ``data`` at ``offset``; a full disk raises ``OSError(ENOSPC)``.

    Plain writes, not a memory map: writing a map of a sparse file on a full disk kills the
    process with SIGBUS.
    """
    file.seek(offset)
    while data:
        data = data[file.write(data) :]


class SpillFile:
    """Fixed-size entries in one data file, with a JSON index written after the data.

    Args:
        folder: Folder of the files.
        name: File name without suffix (``.bin`` data, ``.json`` index).
        fingerprint: Fingerprint of the features; an index with another one is discarded.
        dtype: Storage dtype of the entries.
        writable: This process owns the files (see :func:`claim_spill_name`): it writes them,
            rebuilds them when damaged, and checks each entry once per run. ``False`` opens another
            process's files read-only and checks an entry on every read.
    """

    def __init__(self, folder: Path, name: str, fingerprint: str, dtype: torch.dtype, writable: bool = True) -> None:
        self.data_path = folder / f"{name}.bin"
        self.index_path = folder / f"{name}.json"
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.writable = writable
        self.entries: dict[str, tuple[int, int]] = {}
        self.entry_shape: tuple[int, ...] | None = None
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._verified: set[str] = set()
        self._file: io.FileIO | None = None
        self._load()

    @property
    def entry_bytes(self) -> int:
        """Bytes of one entry."""
        assert self.entry_shape is not None
        return _entry_bytes(self.entry_shape, self.dtype)

    @property
    def data_bytes(self) -> int:
        """Bytes of the listed slots of the data file (free ones between them included)."""
        return 0 if self.entry_shape is None else self._next_slot * self.entry_bytes

    @property
    def needs_new_slot(self) -> bool:
        """Whether the next entry makes the data file grow (no free slot inside it)."""
        return not self._free_slots

    def _note(self, message: str, *args: object) -> None:
        """A problem with the files: a warning when they are ours (we rebuild them), else for debugging only."""
        (logger.warning if self.writable else logger.debug)(message, *args)

    def _usable_index(self) -> tuple[tuple[int, ...], dict[str, tuple[int, int]]] | None:
        """Entry shape and entries of the index; ``None`` if missing, unreadable, foreign or longer than the data."""
        if not self.index_path.exists():
            return None
        try:
            index = json.loads(self.index_path.read_text())
            usable = (
                index["format"] == CACHE_FORMAT_VERSION
                and index["fingerprint"] == self.fingerprint
                and index["dtype"] == str(self.dtype)
            )
            entry_shape = tuple(int(size) for size in index["entry_shape"])
            entries = {str(key): (int(slot), int(crc)) for key, (slot, crc) in index["entries"].items()}
            size = self.data_path.stat().st_size if self.data_path.exists() else 0
        except (OSError, ValueError, KeyError, TypeError) as error:
            self._note("Teacher-feature cache index %s is unreadable (%s); rebuilding it.", self.index_path, error)
            return None
        if not usable:
            self._note("Teacher-feature cache %s was written for other features; rebuilding it.", self.index_path)
            return None
        if entries and (max(slot for slot, _ in entries.values()) + 1) * _entry_bytes(entry_shape, self.dtype) > size:
            self._note(
                "Teacher-feature cache %s is shorter than its index says (a run killed while writing it?); "
                "rebuilding it.",
                self.data_path,
            )
            return None
        return entry_shape, entries

    def _load(self) -> None:
        """Adopt the entries of the files; when they are unusable, rebuild them (ours) or read nothing (another's)."""
        index = self._usable_index()
        if index is None:
            if self.writable:
                self._reset()
            return
        self.entry_shape, self.entries = index
        slots = [slot for slot, _ in self.entries.values()]
        self._next_slot = max(slots, default=-1) + 1
        self._free_slots = sorted(set(range(self._next_slot)) - set(slots))
        if self.writable:
            self._data_file().truncate(self.data_bytes)  # drop what a killed run wrote past its last listed entry
        elif self.entries:
            self._file = io.FileIO(self.data_path, "r")

    def _reset(self) -> None:
        self.close()
        self.data_path.unlink(missing_ok=True)
        self.index_path.unlink(missing_ok=True)
        self.entries, self.entry_shape, self._free_slots, self._next_slot = {}, None, [], 0

    def _data_file(self) -> io.FileIO:
        """The data file, opened (and created) for reading and writing."""
        if self._file is None:
            self.data_path.touch()
            self._file = io.FileIO(self.data_path, "r+")
        return self._file

    def _write_index(self, entries: Mapping[str, tuple[int, int]]) -> None:
        index = {
            "format": CACHE_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "dtype": str(self.dtype),
            "entry_shape": list(self.entry_shape or ()),
            "entries": {key: list(entry) for key, entry in entries.items()},
        }
        # The name is this writer's alone: the lock on the spill name covers it.
        partial = self.index_path.with_name(self.index_path.name + ".partial")
        try:
            with partial.open("w") as file:
                json.dump(index, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, self.index_path)
        except OSError:
            partial.unlink(missing_ok=True)
            raise

    def get(self, key: str) -> np.ndarray | None:
        """The stored entry (read into a new array), or ``None``; an entry failing its checksum is dropped."""
        entry = self.entries.get(key)
        if entry is None or self._file is None:
            return None
        slot, crc = entry
        assert self.entry_shape is not None
        row = np.empty(self.entry_shape, dtype=NUMPY_DTYPES[self.dtype])
        complete = _read_at(self._file, slot * self.entry_bytes, memoryview(row).cast("B"))
        if not complete or (key not in self._verified and zlib.crc32(row) != crc):
            self._note("Teacher-feature cache entry in %s fails its checksum; recomputing it.", self.data_path)
            del self.entries[key]
            if self.writable:
                self._free_slots.append(slot)
            return None
        if self.writable:  # nobody else writes our file: one check per run suffices
            self._verified.add(key)
        return row

    def put(self, key: str, entry: np.ndarray) -> None:
        """Write ``entry`` to a free slot, then list it in the index.

        Raises:
            OSError: The write failed (e.g. ``ENOSPC``); the index does not list the entry, and the
                data file is cut back to its listed slots.
        """
        assert self.writable
        if self.entry_shape is None:
            self.entry_shape = tuple(entry.shape)
        slot = self._free_slots[-1] if self._free_slots else self._next_slot
        data = memoryview(np.ascontiguousarray(entry)).cast("B")
        entries = {**self.entries, key: (slot, zlib.crc32(data))}
        try:
            _write_at(self._data_file(), slot * self.entry_bytes, data)
            self._write_index(entries)
        except OSError:
            self._data_file().truncate(self.data_bytes)
            raise
        if slot == self._next_slot:
            self._next_slot += 1
        else:
            self._free_slots.pop()
        if key in self.entries:
            self._free_slots.append(self.entries[key][0])
        self.entries = entries
        self._verified.add(key)

    def close(self) -> None:
        """Close the data file; the files stay for later runs."""
        if self._file is not None:
            self._file.close()
        self._file = None
