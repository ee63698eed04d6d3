"""Teacher-feature cache: the frozen teacher runs once per training image, not once per epoch.

The teacher and the unaugmented training images never change while the students train, yet
at 1036 px the teacher costs over 95 % of a training step. The cache keeps each image's two
token tensors from the first epoch and hands them back in later ones, so that only the
students run after the first epoch.

Entries live in memory up to a budget; beyond it they go to a memory-mapped file, which a later
run with the same fingerprint reuses::

    <cache_dir>/<fingerprint[:16]>/<name>.bin    entries, one fixed-size slot each
    <cache_dir>/<fingerprint[:16]>/<name>.json   index: entry key -> (slot, CRC-32)

An entry is listed in the index only after its bytes are flushed, and the index is replaced
atomically, so a run killed at any moment leaves either a consistent pair or an index that
fails to load or to match its data file; either way the files are rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

# Bump when anything that shapes the cached tokens or the file layout changes.
CACHE_FORMAT_VERSION = 1
CACHE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


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
    """Key of one training image from its absolute path, byte size and modification time.

    Returns ``None`` when the file cannot be found (its features are then never cached).
    """
    try:
        status = os.stat(path)
    except OSError:
        return None
    identity = f"{os.path.abspath(path)}\0{status.st_size}\0{status.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


class SpillFile:
    """Fixed-size entries in one memory-mapped file, with a JSON index written after the data.

    Args:
        stem: Path of the two files without suffix (``.bin`` data, ``.json`` index).
        fingerprint: Fingerprint of the features; an index with another one is discarded.
        dtype: Storage dtype of the entries.
    """

    def __init__(self, stem: Path, fingerprint: str, dtype: torch.dtype) -> None:
        self.data_path = stem.with_suffix(".bin")
        self.index_path = stem.with_suffix(".json")
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.entries: dict[str, tuple[int, int]] = {}
        self.entry_shape: tuple[int, ...] | None = None
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._verified: set[str] = set()
        self._map: np.memmap | None = None
        self._capacity = 0
        self._load()

    @property
    def _entry_bytes(self) -> int:
        assert self.entry_shape is not None
        return int(np.prod(self.entry_shape)) * np.dtype(_NUMPY_DTYPES[self.dtype]).itemsize

    def _load(self) -> None:
        """Adopt the entries of an earlier run, or start afresh if its files are unusable."""
        if not self.index_path.exists():
            self._reset()
            return
        try:
            index = json.loads(self.index_path.read_text())
            usable = (
                index["format"] == CACHE_FORMAT_VERSION
                and index["fingerprint"] == self.fingerprint
                and index["dtype"] == str(self.dtype)
            )
            entry_shape = tuple(int(size) for size in index["entry_shape"])
            entries = {str(key): (int(slot), int(crc)) for key, (slot, crc) in index["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("Teacher-feature cache index %s is unreadable (%s); rebuilding it.", self.index_path, error)
            self._reset()
            return
        if not usable:
            logger.info("Teacher-feature cache %s was written for other features; rebuilding it.", self.index_path)
            self._reset()
            return
        self.entry_shape = entry_shape
        slots = [slot for slot, _ in entries.values()]
        size = self.data_path.stat().st_size if self.data_path.exists() else 0
        if slots and (max(slots) + 1) * self._entry_bytes > size:
            logger.warning(
                "Teacher-feature cache %s is shorter than its index says (a run killed while writing it?); "
                "rebuilding it.",
                self.data_path,
            )
            self._reset()
            return
        self.entries = entries
        self._next_slot = max(slots, default=-1) + 1
        self._free_slots = sorted(set(range(self._next_slot)) - set(slots))
        if size >= self._entry_bytes:
            self._open(size // self._entry_bytes)

    def _reset(self) -> None:
        self._close_map()
        self.data_path.unlink(missing_ok=True)
        self.index_path.unlink(missing_ok=True)
        self.entries, self.entry_shape, self._free_slots, self._next_slot = {}, None, [], 0

    def _open(self, capacity: int) -> None:
        assert self.entry_shape is not None
        self._close_map()
        with self.data_path.open("ab") as data:
            data.truncate(max(capacity * self._entry_bytes, data.tell()))
        self._capacity = capacity
        self._map = np.memmap(
            self.data_path, dtype=_NUMPY_DTYPES[self.dtype], mode="r+", shape=(capacity, *self.entry_shape)
        )

    def _close_map(self) -> None:
        if self._map is not None:
            self._map.flush()
        self._map, self._capacity = None, 0

    def _write_index(self) -> None:
        index = {
            "format": CACHE_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "dtype": str(self.dtype),
            "entry_shape": list(self.entry_shape or ()),
            "entries": {key: list(entry) for key, entry in self.entries.items()},
        }
        partial = self.index_path.with_suffix(".json.partial")
        with partial.open("w") as file:
            json.dump(index, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, self.index_path)

    def get(self, key: str) -> np.ndarray | None:
        """The stored entry (a view into the file), or ``None``; an entry failing its checksum is dropped."""
        entry = self.entries.get(key)
        if entry is None or self._map is None:
            return None
        slot, crc = entry
        row = self._map[slot]
        if key not in self._verified:
            if zlib.crc32(row) != crc:
                logger.warning("Teacher-feature cache entry in %s fails its checksum; recomputing it.", self.data_path)
                del self.entries[key]
                self._free_slots.append(slot)
                self._write_index()
                return None
            self._verified.add(key)
        return row

    def put(self, key: str, entry: np.ndarray) -> None:
        """Write ``entry`` to a slot, flush it, then list it in the index."""
        if self.entry_shape is None:
            self.entry_shape = tuple(entry.shape)
        if key in self.entries:
            slot = self.entries[key][0]
        elif self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot, self._next_slot = self._next_slot, self._next_slot + 1
        if slot >= self._capacity:
            self._open(max(slot + 1, 2 * self._capacity, 8))
        assert self._map is not None
        self._map[slot] = entry
        self._map.flush()
        self.entries[key] = (slot, zlib.crc32(self._map[slot]))
        self._verified.add(key)
        self._write_index()

    def close(self) -> None:
        """Flush and unmap the data file; the files stay for later runs."""
        self._close_map()


class TeacherFeatureCache:
    """The teacher's shallow and deep tokens of each training image, kept between epochs.

    Entries are stacked ``(2, N, D)`` tensors in ``dtype``: in memory while they fit in
    ``memory_budget_mb``, then in a memory-mapped :class:`SpillFile` under
    ``directory/<fingerprint[:16]>/<name>``. One cache serves one process (``name`` tells the
    processes of a multi-process run apart).

    Args:
        directory: Cache folder (see :func:`ensure_writable`).
        fingerprint: :func:`feature_fingerprint` of everything that shapes the features.
        dtype: Storage dtype, ``torch.float16`` (default) or ``torch.float32``.
        memory_budget_mb: Memory for entries before they spill to disk; ``0`` puts every entry on
            disk, where later runs with the same fingerprint find it.
        name: File name of this process's spill file.

    Example:
        >>> import tempfile
        >>> cache = TeacherFeatureCache(tempfile.mkdtemp(), feature_fingerprint({"teacher": "t"}))
        >>> images = torch.randn(2, 3, 28, 28)
        >>> teacher = lambda x: (x.flatten(2).transpose(1, 2), x.flatten(2).transpose(1, 2) * 2)
        >>> shallow, deep = cache.tokens(["a", "b"], images, teacher)  # computed
        >>> shallow, deep = cache.tokens(["b", "a"], images.flip(0), teacher)  # served from memory
        >>> cache.hits, cache.misses
        (2, 2)
    """

    def __init__(
        self,
        directory: str | Path,
        fingerprint: str,
        dtype: torch.dtype = torch.float16,
        memory_budget_mb: float = 4096.0,
        name: str = "rank0",
    ) -> None:
        if dtype not in _NUMPY_DTYPES:
            msg = f"Cache dtype must be one of {list(CACHE_DTYPES)}, got {dtype}."
            raise ValueError(msg)
        if memory_budget_mb < 0:
            msg = f"cache_memory_budget_mb must be >= 0 (0 keeps every entry on disk), got {memory_budget_mb}."
            raise ValueError(msg)
        self.dtype = dtype
        self.memory_budget_bytes = int(memory_budget_mb * 2**20)
        self.folder = Path(directory) / fingerprint[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.spill = SpillFile(self.folder / name, fingerprint, dtype)
        self._memory: dict[str, torch.Tensor] = {}
        self._memory_bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._memory) + len(self.spill.entries)

    @property
    def disk_entries(self) -> int:
        """Number of entries in the spill file."""
        return len(self.spill.entries)

    def get(self, key: str) -> torch.Tensor | None:
        """The ``(2, N, D)`` entry of ``key`` on the CPU in the storage dtype, or ``None``."""
        if key in self._memory:
            return self._memory[key]
        row = self.spill.get(key)
        return None if row is None else torch.from_numpy(row)

    def put(self, key: str, features: torch.Tensor) -> None:
        """Store a ``(2, N, D)`` entry, in memory while the budget allows, else on disk."""
        entry = features.detach().to(device="cpu", dtype=self.dtype).contiguous()
        size = entry.numel() * entry.element_size()
        if key in self._memory or self._memory_bytes + size <= self.memory_budget_bytes:
            self._memory_bytes += 0 if key in self._memory else size
            self._memory[key] = entry
            return
        if not self.spill.entries:
            logger.info(
                "Teacher-feature cache is beyond its memory budget of %.0f MB; further entries go to %s.",
                self.memory_budget_bytes / 2**20,
                self.spill.data_path,
            )
        self.spill.put(key, entry.numpy())

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
        """One line: entries in memory and on disk, hits and misses."""
        return (
            f"{len(self)} images cached ({len(self._memory)} in memory, {self.disk_entries} on disk "
            f"in {self.spill.data_path.parent}), {self.hits} hits, {self.misses} misses"
        )

    def close(self) -> None:
        """Free the memory entries and unmap the spill file (which stays for later runs)."""
        self._memory.clear()
        self._memory_bytes = 0
        self.spill.close()
