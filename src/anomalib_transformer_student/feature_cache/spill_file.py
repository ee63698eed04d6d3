"""One process's entries on disk: ``rank<N>.bin`` (fixed-size slots) and ``rank<N>.log`` (their index).

The index is a header line (flat JSON: format, dtype, entry shape), then ``key slot crc32`` per entry, appended
after the entry's bytes. Only its rank writes a file; the others read it. Nothing read is trusted: header and
lines are bounded and checked field by field (a bad line is skipped, a bad header skips the file), and every
entry read is checked against its CRC.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import zlib

import numpy as np

from .run_folder import RunFolder, open_file
from .settings import NUMPY_DTYPES

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_LOG_BYTES = 256 * 2**20
MAX_HEADER_BYTES = 1024
MAX_DIM = 2**24
MAX_ENTRY_BYTES = 2**31
KEY = re.compile(rb"[\w-]{1,64}(/\d{1,6})?\Z", re.ASCII)  # an image key, optionally with a tile number
LINE = re.compile(rb"([^ ]{1,72}) (\d{1,12}) (\d{1,10})\Z")


class DamagedSpillFile(ValueError):
    """A spill file's header is not one this cache writes."""


def _parse_header(line: bytes, dtype: str) -> tuple[int, ...]:
    """The entry shape the header states; :class:`DamagedSpillFile` if any field is off."""
    try:
        header = json.loads(line)
    except Exception as error:  # nesting, numbers too long, bad text: all damage
        raise DamagedSpillFile(str(error)[:80]) from None
    shape = header.get("shape") if isinstance(header, dict) else None
    ours = isinstance(shape, list) and header.get("format") == FORMAT_VERSION and header.get("dtype") == dtype
    if not ours or len(shape) != 3 or not all(type(size) is int and 0 < size <= MAX_DIM for size in shape):
        raise DamagedSpillFile(f"header {line[:80]!r}")
    if int(np.prod(shape)) * np.dtype(NUMPY_DTYPES[dtype]).itemsize > MAX_ENTRY_BYTES:
        raise DamagedSpillFile(f"entries of {shape}")
    return tuple(shape)


class SpillFile:
    """The entries of one rank in a run folder, opened to write (its own) or to read (another rank's).

    ``writable``: one's own file, created if missing. Raises ``OSError`` for files that cannot be opened (missing,
    a link, not the user's) and :class:`DamagedSpillFile` for a header the cache did not write (or another dtype).

    Example:
        >>> import tempfile
        >>> from .run_folder import CacheRoot
        >>> run = CacheRoot(tempfile.mkdtemp()).create_run({})
        >>> spill = SpillFile(run, 0, "float32", writable=True)
        >>> spill.put("k", np.ones((2, 3, 4), np.float32))
        >>> float(SpillFile(run, 0, "float32").get("k").sum())
        24.0
    """

    def __init__(self, folder: RunFolder, rank: int, dtype: str, writable: bool = False) -> None:
        self.name = f"{folder.path}/rank{rank}"
        self.dtype = dtype
        self.writable = writable
        self.entries: dict[str, tuple[int, int]] = {}
        self.shape: tuple[int, ...] | None = None
        self._offset = self._next_slot = 0
        self._data = self._log = -1
        flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
        try:
            self._data = open_file(f"rank{rank}.bin", folder.fd, flags)
            self._log = open_file(f"rank{rank}.log", folder.fd, flags)
            self.refresh()
            if writable:  # a torn last line of an earlier holder is overwritten by the next entry
                os.ftruncate(self._log, self._offset)
        except BaseException:
            self.close()
            raise

    @property
    def entry_bytes(self) -> int:
        """Bytes of one entry (0 before the first)."""
        return 0 if self.shape is None else int(np.prod(self.shape)) * np.dtype(NUMPY_DTYPES[self.dtype]).itemsize

    def refresh(self) -> None:
        """Take in the index lines added since the last call (only whole lines; a line that fails is skipped)."""
        size = min(os.fstat(self._log).st_size, MAX_LOG_BYTES)
        if size <= self._offset:
            return
        text = os.pread(self._log, size - self._offset, self._offset)
        complete = text.rfind(b"\n") + 1
        lines = text[:complete].split(b"\n")[:-1]
        if self._offset == 0 and lines:
            if len(lines[0]) > MAX_HEADER_BYTES:
                raise DamagedSpillFile(f"header of {len(lines[0])} bytes")
            self.shape = _parse_header(lines.pop(0), self.dtype)
        slots = os.fstat(self._data).st_size // self.entry_bytes if self.shape else 0
        for line in lines:
            match = LINE.match(line)
            if match and KEY.match(match.group(1)) and int(match.group(2)) < slots and int(match.group(3)) < 2**32:
                self.entries[match.group(1).decode()] = (int(match.group(2)), int(match.group(3)))
                self._next_slot = max(self._next_slot, int(match.group(2)) + 1)
        self._offset += complete

    def get(self, key: str) -> np.ndarray | None:
        """The entry of ``key`` (checked against its CRC on every read), or ``None``."""
        if key not in self.entries or self._data < 0:
            return None
        slot, crc = self.entries[key]
        row = np.empty(self.shape, dtype=NUMPY_DTYPES[self.dtype])
        buffer = memoryview(row).cast("B")
        if os.preadv(self._data, [buffer], slot * self.entry_bytes) != len(buffer) or zlib.crc32(buffer) != crc:
            logger.warning("Teacher-feature cache: an entry of %s fails its checksum; recomputing it.", self.name)
            del self.entries[key]
            return None
        return row

    def put(self, key: str, entry: np.ndarray) -> None:
        """Append ``entry``, then its index line; on ``OSError`` (full disk) nothing new is listed."""
        assert self.writable and KEY.match(key.encode())
        header = b""
        if self.shape is None:
            header = json.dumps({"format": FORMAT_VERSION, "dtype": self.dtype, "shape": list(entry.shape)}).encode()
            header += b"\n"
        data = memoryview(np.ascontiguousarray(entry)).cast("B")
        slot, crc = self._next_slot, zlib.crc32(data)
        record = header + f"{key} {slot} {crc}\n".encode()
        try:
            _write_at(self._data, slot * len(data), data)
            _write_at(self._log, self._offset, memoryview(record))
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._log, self._offset)
            raise
        self._next_slot += 1
        self.shape = self.shape or tuple(entry.shape)
        self._offset += len(record)
        self.entries[key] = (slot, crc)

    def close(self) -> None:
        """Close the files (they stay until the run folder is removed)."""
        for descriptor in (self._data, self._log):
            if descriptor >= 0:
                os.close(descriptor)
        self._data = self._log = -1


def _write_at(descriptor: int, offset: int, data: memoryview) -> None:
    """Write all of ``data`` at ``offset`` (plain writes: a memory map would die with SIGBUS on a full disk)."""
    while data:
        count = os.pwrite(descriptor, data, offset)
        data, offset = data[count:], offset + count
