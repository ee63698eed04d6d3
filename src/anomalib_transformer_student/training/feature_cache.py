"""Teacher-feature cache: the frozen teacher runs once per training image, not once per epoch.

The teacher and the unaugmented training images never change while the students train, yet
at 1036 px the teacher costs over 95 % of a training step. The cache keeps each image's two
token tensors from the first epoch and hands them back in later ones, so that only the
students run after the first epoch.

Entries live in memory up to a budget; beyond it they go to a spill file on disk, which later
runs with the same fingerprint read::

    <cache_dir>/<fingerprint[:16]>/rank0.lock   locked (flock) by the one process that writes rank0.*
    <cache_dir>/<fingerprint[:16]>/rank0.bin    entries, one fixed-size slot each
    <cache_dir>/<fingerprint[:16]>/rank0.json   index: entry key -> (slot, CRC-32)

Several processes may share the folder (two categories trained at once, anomalib's benchmark
jobs, DDP ranks). Each writes only a file it holds the lock of: ``rank<r>``, else ``rank<r>-1``,
``rank<r>-2``, ...; a file whose lock is free belongs to a finished (or killed) run and is
adopted, so sequential runs fill one file. The other files are read only, and each of their
entries is checked against its CRC on every read, since their writer may replace it. An entry is
listed in the index only after its bytes are written, and the index is replaced atomically, so a
run killed at any moment leaves either a consistent pair or an index that fails to load or to
match its data file (rebuilt by the next owner, never read); every entry is checked against its
CRC when first read in a run. All spill files of a fingerprint together stay within a disk
budget; a full disk or the budget stops further spilling with one warning, never training.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

try:
    import fcntl
except ImportError:  # Windows: spill files are private to their process, see claim_spill_name
    fcntl = None

logger = logging.getLogger(__name__)

# Bump when anything that shapes the cached tokens, their keys or the file layout changes.
CACHE_FORMAT_VERSION = 2
CACHE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CacheDirectoryError(OSError):
    """The cache folder cannot be created or written to."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/anomalib_transformer_student/teacher_features`` (``~/.cache/...`` by default)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "anomalib_transformer_student" / "teacher_features"


def ensure_writable(directory: str | Path) -> Path:
    """Create ``directory`` if needed and check that files can be written in it.

    Raises:
        CacheDirectoryError: Naming the folder, the reason and the ways out.
    """
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        msg = (
            f"The teacher-feature cache folder '{directory}' is not writable ({error.strerror or error}). "
            "Point `cache_dir` (--model.cache_dir) to a writable folder, or turn the cache off with "
            "`feature_cache=False` (--model.feature_cache false)."
        )
        raise CacheDirectoryError(msg) from error
    return directory


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, shapes, dtypes and values): two teachers share it only if equal."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def feature_fingerprint(components: Mapping[str, object]) -> str:
    """SHA-256 of everything that shapes the cached features (teacher, weights, layers, size, pre-processing, ...).

    Example:
        >>> a = feature_fingerprint({"teacher": "vit_small_patch14_dinov2", "image_size": 224})
        >>> a == feature_fingerprint({"teacher": "vit_small_patch14_dinov2", "image_size": 448})
        False
    """
    payload = json.dumps({"format": CACHE_FORMAT_VERSION, **components}, sort_keys=True, default=repr)
    return hashlib.sha256(payload.encode()).hexdigest()


def image_key(path: str | os.PathLike[str]) -> str | None:
    """Key of one training image: the SHA-256 of its bytes (32 hex digits).

    The content, not the path, size and modification time: a rewritten image is recomputed even
    when its size and modification time are those of the old one (tools that restore times, such
    as ``tar``, ``rsync -t`` or ``cp -p``, do exactly that), and a moved or copied dataset keeps
    its entries. Returns ``None`` when the file cannot be read (its features are then never cached).

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".png") as file:
        ...     _ = file.write(b"pixels")
        ...     file.flush()
        ...     image_key(file.name) == hashlib.sha256(b"pixels").hexdigest()[:32]
        True
    """
    try:
        content = Path(path).read_bytes()
    except OSError:
        return None
    return hashlib.sha256(content).hexdigest()[:32]


class ImageKeys:
    """:func:`image_key` remembered per file state, so that each image is read and hashed once per fit, not per epoch.

    The state holds the change time, which no tool can set back, so an image rewritten during
    the fit is read again.

    Example:
        >>> keys = ImageKeys()
        >>> keys("no/such/image.png") is None
        True
    """

    def __init__(self) -> None:
        self._known: dict[tuple[object, ...], str | None] = {}

    def __call__(self, path: str | os.PathLike[str]) -> str | None:
        """The key of the image at ``path``, or ``None`` when it cannot be read."""
        try:
            status = os.stat(path)
        except OSError:
            return None
        state = (os.path.abspath(path), status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino)
        if state not in self._known:
            self._known[state] = image_key(path)
        return self._known[state]


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
    return int(np.prod(shape)) * np.dtype(_NUMPY_DTYPES[dtype]).itemsize


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
        row = np.empty(self.entry_shape, dtype=_NUMPY_DTYPES[self.dtype])
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


class TeacherFeatureCache:
    """The teacher's shallow and deep tokens of each training image, kept between epochs.

    Entries are stacked ``(2, N, D)`` tensors in ``dtype``: in memory while they fit in
    ``memory_budget_mb``, then in this process's :class:`SpillFile` under
    ``directory/<fingerprint[:16]>/`` while all spill files there fit in ``disk_budget_mb``.
    Entries that the other spill files there hold (those of earlier or concurrent runs) are
    read from them.

    Args:
        directory: Cache folder (see :func:`ensure_writable`).
        fingerprint: :func:`feature_fingerprint` of everything that shapes the features.
        dtype: Storage dtype, ``torch.float16`` (default) or ``torch.float32``.
        memory_budget_mb: Memory for entries before they spill to disk; ``0`` puts every entry on
            disk, where later runs with the same fingerprint find it.
        disk_budget_mb: Disk for all spill files of this fingerprint together (every category and
            process); an entry beyond it is not cached (one warning). ``0`` keeps nothing on disk.
        rank: Global rank of the process, the start of its spill file's name.

    Example:
        >>> import tempfile
        >>> cache = TeacherFeatureCache(tempfile.mkdtemp(), feature_fingerprint({"teacher": "t"}))
        >>> images = torch.randn(2, 3, 28, 28)
        >>> teacher = lambda x: (x.flatten(2).transpose(1, 2), x.flatten(2).transpose(1, 2) * 2)
        >>> shallow, deep = cache.tokens(["a", "b"], images, teacher)  # computed
        >>> shallow, deep = cache.tokens(["b", "a"], images.flip(0), teacher)  # served from memory
        >>> cache.hits, cache.misses
        (2, 2)
        >>> cache.close()
    """

    def __init__(
        self,
        directory: str | Path,
        fingerprint: str,
        dtype: torch.dtype = torch.float16,
        memory_budget_mb: float = 4096.0,
        disk_budget_mb: float = 20480.0,
        rank: int = 0,
    ) -> None:
        if dtype not in _NUMPY_DTYPES:
            msg = f"Cache dtype must be one of {list(CACHE_DTYPES)}, got {dtype}."
            raise ValueError(msg)
        for name, budget in (("cache_memory_budget_mb", memory_budget_mb), ("cache_disk_budget_mb", disk_budget_mb)):
            if budget < 0:
                msg = f"{name} must be >= 0, got {budget}."
                raise ValueError(msg)
        self.dtype = dtype
        self.memory_budget_bytes = int(memory_budget_mb * 2**20)
        self.disk_budget_mb = disk_budget_mb
        self.disk_budget_bytes = int(disk_budget_mb * 2**20)
        self.folder = Path(directory) / fingerprint[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        name, self._lock = claim_spill_name(self.folder, rank)
        # Without a lock (no flock here) the file is private, and the others cannot be told safe to read.
        self._private = self._lock is None
        self.spill = SpillFile(self.folder, name, fingerprint, dtype)
        self.others = [] if self._private else self._other_spills(name, fingerprint)
        self._memory: dict[str, torch.Tensor] = {}
        self._memory_bytes = 0
        self._spilling = True  # until the disk budget or a full disk refuses an entry
        self.hits = 0
        self.misses = 0

    def _other_spills(self, own: str, fingerprint: str) -> list[SpillFile]:
        """The other processes' spill files of this fingerprint that hold entries, opened read-only."""
        others = []
        for index in sorted(self.folder.glob("*.json")):
            if index.stem == own:
                continue
            try:
                spill = SpillFile(self.folder, index.stem, fingerprint, self.dtype, writable=False)
            except OSError:  # removed or rebuilt by its owner while we looked
                continue
            if spill.entries:
                others.append(spill)
        return others

    def __len__(self) -> int:
        return len(self._memory) + self.disk_entries

    @property
    def memory_bytes(self) -> int:
        """Bytes the entries in memory take (at most ``memory_budget_bytes``)."""
        return self._memory_bytes

    @property
    def disk_entries(self) -> int:
        """Number of distinct entries in the spill files: this process's and the others it reads."""
        return len(set(self.spill.entries).union(*(other.entries for other in self.others)))

    def get(self, key: str) -> torch.Tensor | None:
        """The ``(2, N, D)`` entry of ``key`` on the CPU in the storage dtype, or ``None``."""
        if key in self._memory:
            return self._memory[key]
        for spill in (self.spill, *self.others):
            row = spill.get(key)
            if row is not None:
                return torch.from_numpy(row)
        return None

    def put(self, key: str, features: torch.Tensor) -> None:
        """Store a ``(2, N, D)`` entry, in memory while the budget allows, else on disk while that allows."""
        entry = features.detach().to(device="cpu", dtype=self.dtype).contiguous()
        size = entry.numel() * entry.element_size()
        if key in self._memory or self._memory_bytes + size <= self.memory_budget_bytes:
            self._memory_bytes += 0 if key in self._memory else size
            self._memory[key] = entry
        elif self._spilling:
            self._spill(key, entry, size)

    def _spill(self, key: str, entry: torch.Tensor, size: int) -> None:
        """Write an entry to this process's spill file, unless the disk budget or the disk refuses it."""
        if self.spill.needs_new_slot:
            used = folder_bytes(self.folder)
            if used + size > self.disk_budget_bytes:
                self._stop_spilling(
                    f"its disk budget of {self.disk_budget_mb:g} MB is reached ({used / 2**20:.1f} MB "
                    f"used in {self.folder}, {size / 2**20:.1f} MB more needed per image). Raise "
                    "cache_disk_budget_mb (--model.cache_disk_budget_mb), or delete that folder while no training "
                    "uses it"
                )
                return
        if not self.spill.entries:
            logger.info(
                "Teacher-feature cache is beyond its memory budget of %.0f MB; further entries go to %s.",
                self.memory_budget_bytes / 2**20,
                self.spill.data_path,
            )
        try:
            self.spill.put(key, entry.numpy())
        except OSError as error:
            if error.errno in _DISK_FULL:
                free = shutil.disk_usage(self.folder).free
                reason = (
                    f"the disk of {self.folder} is full ({free / 2**20:.1f} MB free, {size / 2**20:.1f} MB needed "
                    "per image). Free space there, or point cache_dir (--model.cache_dir) to a larger disk"
                )
            else:
                reason = f"writing {self.spill.data_path} failed ({error})"
            self._stop_spilling(reason)

    def _stop_spilling(self, reason: str) -> None:
        self._spilling = False
        logger.warning(
            "Teacher-feature cache: %s. Further images are not cached; the teacher computes them every epoch.", reason
        )

    def _as_stored(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` rounded to the storage dtype and back: what later epochs read from the cache."""
        return features.to(self.dtype).to(features.dtype)

    def tokens(
        self,
        keys: Sequence[str | None],
        images: torch.Tensor,
        compute: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shallow and deep tokens of a batch, computing (and storing) only the entries not cached.

        Args:
            keys: One key per image (see :func:`image_key`); ``None`` is never cached.
            images: The batch, as the teacher takes it.
            compute: The teacher: images -> ``(shallow, deep)``, each ``(B, N, D)``.

        Returns:
            ``(shallow, deep)`` on the images' device; freshly computed rows are rounded to the
            storage dtype, so that every epoch (and a resumed run) trains on the same values.
        """
        cached = [None if key is None else self.get(key) for key in keys]
        missing = [index for index, entry in enumerate(cached) if entry is None]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        # Layout (2, B, N, D), so that the shallow and the deep tokens are each contiguous.
        if len(missing) == len(keys):
            fresh = self._as_stored(torch.stack(compute(images)))
            features = fresh
        else:
            fresh = self._as_stored(torch.stack(compute(images[missing]))) if missing else None
            entry_shape = next(entry for entry in cached if entry is not None).shape
            dtype = torch.float32 if fresh is None else fresh.dtype
            features = torch.empty((2, len(keys), *entry_shape[1:]), device=images.device, dtype=dtype)
            for index, entry in enumerate(cached):
                # One copy per entry, converting dtype and device on the way.
                if entry is not None:
                    features[:, index].copy_(entry)
            if fresh is not None:
                features[:, missing] = fresh
        if fresh is not None:
            for row, index in enumerate(missing):
                key = keys[index]
                if key is not None:
                    self.put(key, fresh[:, row])
        return features[0], features[1]

    def summary(self) -> str:
        """One line: entries in memory and on disk, hits and misses, and the disk that the spill files take."""
        return (
            f"{len(self)} images cached ({len(self._memory)} in memory, {self.disk_entries} on disk), "
            f"{self.hits} hits, {self.misses} misses; {folder_bytes(self.folder) / 2**20:.1f} MB on disk in "
            f"{self.folder} (budget {self.disk_budget_mb:g} MB)"
        )

    def close(self) -> None:
        """Free the memory entries, close the spill files (which stay for later runs) and release the lock."""
        self._memory.clear()
        self._memory_bytes = 0
        for spill in (self.spill, *self.others):
            spill.close()
        if self._private:  # nobody would ever read it again
            self.spill.data_path.unlink(missing_ok=True)
            self.spill.index_path.unlink(missing_ok=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
