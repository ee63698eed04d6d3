"""Spill files of the teacher-feature cache: fixed-size entries on disk, one writer per file.

In a fingerprint folder (see :mod:`.cache_folder`)::

    rank0.lock   locked (flock) by the one process that writes rank0.*
    rank0.bin    entries, one fixed-size slot each
    rank0.log    index: a header line, then one line "key slot crc32" per entry, appended after its bytes

Each process writes only a file it holds the lock of (:func:`claim_spill_name`); the others are
read only. Entries are written with plain file writes (a memory map of a sparse file kills the
process with SIGBUS on a full disk) and listed only after their bytes are written, by appending
one short line, so adding an entry costs the same at the 50,000th as at the first, and a reader
of another process's file reads only the lines added since it last looked. A run killed at any
moment leaves at most a torn last line (ignored, then cut by the next owner) and unlisted bytes
(cut). A later line for a slot replaces the earlier one. The owner compacts the log when it adopts
a file whose log has grown much longer than its entries.

Nothing read is trusted: the header's entry shape is bounded, every line is checked (key, slot
within the data file, CRC range) and dropped if it fails, the log's size is bounded, and an
entry's bytes are checked against its CRC (once per run in one's own file, on every read in
another's).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import uuid
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from .cache_folder import CacheFolderError, FingerprintFolder, _lock, fcntl
from .dtypes import NUMPY_DTYPES

logger = logging.getLogger(__name__)

# Bump when anything that shapes the cached tokens, their keys or the file layout changes.
CACHE_FORMAT_VERSION = 3
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
MAX_LOG_BYTES = 256 * 2**20  # about 4 million entries
MAX_HEADER_BYTES = 4096
MAX_ENTRY_BYTES = 2**31
MAX_DIM = 2**24
KEY = re.compile(r"[\w-]{1,64}(/\d{1,6})?\Z", re.ASCII)  # an image key, or an image key and a tile
SPILL_NAME = re.compile(r"rank\d{1,6}(-[\w-]{1,80})?\Z", re.ASCII)


def claim_spill_name(folder: FingerprintFolder, rank: int = 0) -> tuple[str, int | None]:
    """The name of a spill file in ``folder`` that no running process writes, and the descriptor that locks it.

    Tries ``rank<rank>``, ``rank<rank>-1``, ``rank<rank>-2``, ... and keeps the first whose
    ``.lock`` file it can lock exclusively: the files of a finished run are adopted, those of a
    running one never shared. The lock lasts while the descriptor is open, and the kernel drops
    it when the process dies, even by SIGKILL. Lock files are opened read-only (a lock needs no
    more), so a group member locks another's. Without ``flock`` (Windows, or a filesystem that
    refuses locks) the descriptor is ``None`` and the name is unique to this process: its files are
    private and removed when the cache closes (those of a killed process on this host with the next
    claim).

    Example:
        >>> import tempfile
        >>> from anomalib_transformer_student.training.cache_folder import CacheRoot
        >>> folder = CacheRoot(tempfile.mkdtemp()).fingerprint("f" * 16)
        >>> (first, lock), (second, _) = claim_spill_name(folder), claim_spill_name(folder)
        >>> first, second
        ('rank0', 'rank0-1')
        >>> os.close(lock)
        >>> claim_spill_name(folder)[0]
        'rank0'
    """
    host = _host()
    private = f"rank{rank}-p{os.getpid()}-{host}-{uuid.uuid4().hex[:8]}"
    if fcntl is None:
        return private, None
    number = 0
    while True:
        name = f"rank{rank}-{number}" if number else f"rank{rank}"
        descriptor = folder.open_file(f"{name}.lock", write=False, create=True)
        try:
            locked = _lock(descriptor, exclusive=True, wait=False) and _has_locks(descriptor)
        except OSError as error:  # e.g. ENOLCK on a network filesystem without locking
            os.close(descriptor)
            if isinstance(error, CacheFolderError):
                raise
            _reclaim_private(folder, host)
            return private, None
        if locked:
            return name, descriptor
        os.close(descriptor)
        number += 1


def _host() -> str:
    """The machine's name as it may stand in a file name."""
    return re.sub(r"\W", "_", socket.gethostname(), flags=re.ASCII)[:40] or "host"


def _has_locks(descriptor: int) -> bool:
    """Whether the filesystem enforces the lock just taken (a second, conflicting one is refused).

    Raises ``OSError`` where it does not: the name must then be private.
    """
    try:
        probe = os.open(f"/proc/self/fd/{descriptor}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True  # no /proc: trust the lock
    try:
        if _lock(probe, exclusive=True, wait=False):
            raise OSError(errno.ENOLCK, "file locks are not enforced here")
    finally:
        os.close(probe)
    return True


def _reclaim_private(folder: FingerprintFolder, host: str) -> None:
    """Remove private spill files that a killed process of this host left (its process id is gone)."""
    pattern = re.compile(rf"rank\d+-p(\d+)-{re.escape(host)}-[0-9a-f]{{8}}\Z")
    for name in {*folder.names(".bin"), *folder.names(".log")}:  # a file's two halves, once
        match = pattern.match(name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            for suffix in (".bin", ".log"):
                folder.unlink(name + suffix)
        except OSError:
            continue


def _entry_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return int(np.prod(shape)) * np.dtype(NUMPY_DTYPES[dtype]).itemsize


def _read_at(descriptor: int, offset: int, buffer: memoryview) -> bool:
    """Fill ``buffer`` from ``offset``; ``False`` when the file ends first."""
    while buffer:
        count = os.preadv(descriptor, [buffer], offset)
        if not count:
            return False
        buffer, offset = buffer[count:], offset + count
    return True


def _write_at(descriptor: int, offset: int, data: memoryview) -> None:
    """Write all of ``data`` at ``offset``; a full disk raises ``OSError(ENOSPC)``.

    Plain writes, not a memory map: writing a map of a sparse file on a full disk kills the
    process with SIGBUS.
    """
    while data:
        count = os.pwrite(descriptor, data, offset)
        data, offset = data[count:], offset + count


def _header(fingerprint: str, dtype: torch.dtype, entry_shape: Sequence[int]) -> bytes:
    fields = {"format": CACHE_FORMAT_VERSION, "fingerprint": fingerprint, "dtype": str(dtype)}
    return (json.dumps({**fields, "entry_shape": list(entry_shape)}) + "\n").encode()


def _index_line(key: str, slot: int, crc: int) -> bytes:
    return f"{key} {slot} {crc}\n".encode()


class SpillFile:
    """Fixed-size entries in one data file, with an append-only index written after the data.

    Args:
        folder: The fingerprint folder of the files.
        name: File name without suffix (``.bin`` data, ``.log`` index).
        fingerprint: Fingerprint of the features; an index with another one is discarded.
        dtype: Storage dtype of the entries.
        writable: This process owns the files (see :func:`claim_spill_name`): it writes them,
            rebuilds them when damaged, and checks each entry once per run. ``False`` opens another
            process's files read-only, checks an entry on every read, and takes in what its owner
            adds with :meth:`refresh`.

    Raises:
        OSError: The files cannot be opened (for another's: they are links, not regular files, or,
            in a private folder, not the user's).
    """

    def __init__(
        self, folder: FingerprintFolder, name: str, fingerprint: str, dtype: torch.dtype, writable: bool = True
    ) -> None:
        if not SPILL_NAME.match(name):
            msg = f"'{name}' is not a spill file name."
            raise ValueError(msg)
        self.folder = folder
        self.name = name
        self.data_path = folder.path / f"{name}.bin"
        self.index_path = folder.path / f"{name}.log"
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.writable = writable
        self.entries: dict[str, tuple[int, int]] = {}
        self.entry_shape: tuple[int, ...] | None = None
        self._owners: dict[int, str] = {}  # slot -> key
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._verified: set[str] = set()
        self._lines = 0  # index lines read, for compaction
        self._offset = 0  # bytes of the index taken in
        self._data = -1
        self._log = -1
        try:
            self._open()
        except BaseException:
            self.close()
            raise

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

    def _open(self) -> None:
        create = self.writable
        self._data = self.folder.open_file(f"{self.name}.bin", write=self.writable, create=create)
        self._log = self.folder.open_file(f"{self.name}.log", write=self.writable, create=create)
        usable = self._take_in(os.fstat(self._log).st_size)
        if not self.writable:
            return
        if not usable or self.entry_shape is None:  # nothing listed (or a torn header): start afresh
            self._reset()
            return
        self._free_slots = sorted(set(range(self._next_slot)) - set(self._owners))
        os.ftruncate(self._data, self.data_bytes)  # drop what a killed run wrote past its last listed entry
        if self._offset != os.fstat(self._log).st_size or self._lines > 2 * len(self.entries) + 64:
            self._compact()

    def _take_in(self, size: int) -> bool:
        """Read the index from where it was last read up to ``size``; ``False`` if it is unusable."""
        if size > MAX_LOG_BYTES:
            self._note("Teacher-feature cache index %s is larger than any cache writes; ignoring it.", self.index_path)
            return False
        if size <= self._offset:
            return True
        text = os.pread(self._log, size - self._offset, self._offset)
        complete = text.rfind(b"\n") + 1  # a torn last line waits (a running writer) or is cut (ours, adopted)
        start = 0
        if self._offset == 0:
            end = text.find(b"\n", 0, MAX_HEADER_BYTES)
            if end < 0:
                return complete == 0 and len(text) < MAX_HEADER_BYTES
            if not self._read_header(text[:end]):
                return False
            start = end + 1
        slots = os.fstat(self._data).st_size // self.entry_bytes  # whole entries the data file holds
        for line in text[start:complete].splitlines():
            self._lines += 1
            self._take_line(line, slots)
        self._offset += complete
        return True

    def _read_header(self, line: bytes) -> bool:
        try:
            header = json.loads(line)
            usable = (
                header["format"] == CACHE_FORMAT_VERSION
                and header["fingerprint"] == self.fingerprint
                and header["dtype"] == str(self.dtype)
            )
            shape = tuple(header["entry_shape"])
            bounded = (
                len(shape) == 3
                and all(type(size) is int and 0 < size <= MAX_DIM for size in shape)
                and _entry_bytes(shape, self.dtype) <= MAX_ENTRY_BYTES
            )
        except (ValueError, KeyError, TypeError):
            self._note("Teacher-feature cache index %s is unreadable; rebuilding it.", self.index_path)
            return False
        if not usable or not bounded:
            self._note("Teacher-feature cache %s was written for other features; rebuilding it.", self.index_path)
            return False
        self.entry_shape = shape
        return True

    def _take_line(self, line: bytes, slots: int) -> None:
        """Take in one ``key slot crc`` line if every field is sound; a later line for a slot wins."""
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            return
        key, slot, crc = parts[0].decode("ascii", "replace"), int(parts[1]), int(parts[2])
        if not KEY.match(key) or crc >= 2**32 or slot >= slots:
            return
        previous = self._owners.pop(slot, None)
        if previous is not None:
            self.entries.pop(previous, None)
        if key in self.entries:
            self._owners.pop(self.entries[key][0], None)
        self.entries[key] = (slot, crc)
        self._owners[slot] = key
        self._verified.discard(key)
        self._next_slot = max(self._next_slot, slot + 1)

    def refresh(self) -> bool:
        """Take in the entries another process's file gained since it was last read.

        Returns ``False`` when its owner rebuilt or compacted it (a new file at its name): reopen it.
        """
        try:
            status = os.stat(f"{self.name}.log", dir_fd=self.folder.fd, follow_symlinks=False)
        except OSError:
            return False
        held = os.fstat(self._log)
        if (status.st_ino, status.st_dev) != (held.st_ino, held.st_dev) or held.st_size < self._offset:
            return False
        return self._take_in(held.st_size)

    def _reset(self) -> None:
        os.ftruncate(self._data, 0)
        os.ftruncate(self._log, 0)
        self.entries, self._owners, self.entry_shape, self._free_slots, self._next_slot = {}, {}, None, [], 0
        self._offset = self._lines = 0

    def _compact(self) -> None:
        """Rewrite the index with one line per entry (replacing it atomically: readers see old or new)."""
        assert self.entry_shape is not None
        partial = f"{self.name}.log.partial"
        self.folder.unlink(partial)  # whatever lies there (even a link) is not followed, only removed
        lines = [_header(self.fingerprint, self.dtype, self.entry_shape)]
        lines += [_index_line(key, slot, crc) for key, (slot, crc) in self.entries.items()]
        descriptor = self.folder.open_file(partial, write=True, create=True)
        try:
            _write_at(descriptor, 0, memoryview(b"".join(lines)))
            os.fsync(descriptor)
            self.folder.replace(partial, f"{self.name}.log")
        except OSError:
            os.close(descriptor)
            self.folder.unlink(partial)
            raise
        os.close(self._log)
        self._log = self.folder.open_file(f"{self.name}.log", write=True)
        self._offset, self._lines = os.fstat(self._log).st_size, len(self.entries)

    def get(self, key: str) -> np.ndarray | None:
        """The stored entry (read into a new array), or ``None``; an entry failing its checksum is dropped."""
        entry = self.entries.get(key)
        if entry is None or self._data < 0:
            return None
        slot, crc = entry
        assert self.entry_shape is not None
        row = np.empty(self.entry_shape, dtype=NUMPY_DTYPES[self.dtype])
        complete = _read_at(self._data, slot * self.entry_bytes, memoryview(row).cast("B"))
        if not complete or (key not in self._verified and zlib.crc32(row) != crc):
            self._note("Teacher-feature cache entry in %s fails its checksum; recomputing it.", self.data_path)
            del self.entries[key]
            self._owners.pop(slot, None)
            if self.writable:
                self._free_slots.append(slot)
            return None
        if self.writable:  # nobody else writes our file: one check per run suffices
            self._verified.add(key)
        return row

    def put(self, key: str, entry: np.ndarray) -> None:
        """Write ``entry`` to a free slot, then list it by appending one line to the index.

        Raises:
            OSError: The write failed (e.g. ``ENOSPC``); the index does not list the entry, and the
                files are cut back to their listed slots and lines.
        """
        assert self.writable
        if not KEY.match(key):
            msg = f"Cache key '{key}' is not 1-64 letters, digits, '_' or '-', optionally followed by '/' and a tile."
            raise ValueError(msg)
        header = b""
        if self.entry_shape is None:
            self.entry_shape = tuple(entry.shape)
            header = _header(self.fingerprint, self.dtype, self.entry_shape)
        slot = self._free_slots[-1] if self._free_slots else self._next_slot
        data = memoryview(np.ascontiguousarray(entry)).cast("B")
        crc = zlib.crc32(data)
        try:
            _write_at(self._data, slot * self.entry_bytes, data)
            record = header + _index_line(key, slot, crc)
            _write_at(self._log, self._offset, memoryview(record))
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._data, self.data_bytes)
                os.ftruncate(self._log, self._offset)
            if header:
                self.entry_shape = None
            raise
        self._offset += len(record)
        self._lines += 1
        if slot == self._next_slot:
            self._next_slot += 1
        else:
            self._free_slots.pop()
        if key in self.entries:
            old = self.entries[key][0]
            self._owners.pop(old, None)
            self._free_slots.append(old)
        self.entries[key] = (slot, crc)
        self._owners[slot] = key
        self._verified.add(key)

    def remove_files(self) -> None:
        """Delete the data and index files (a private spill file that nobody will read again)."""
        self.close()
        for suffix in (".bin", ".log"):
            self.folder.unlink(self.name + suffix)

    def close(self) -> None:
        """Close the files; they stay for later runs."""
        for descriptor in (self._data, self._log):
            if descriptor >= 0:
                os.close(descriptor)
        self._data = self._log = -1
