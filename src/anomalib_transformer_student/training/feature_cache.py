"""Teacher-feature cache: the frozen teacher runs once per training image, not once per epoch.

The teacher and the unaugmented training images never change while the students train, yet
at 1036 px the teacher costs over 95 % of a training step. The cache keeps each image's two
token tensors from the first epoch and hands them back in later ones, so that only the
students run after the first epoch.

Entries live in memory up to a budget; beyond it they go to a spill file on disk
(:mod:`.spill_file`) in the fingerprint's folder (:mod:`.cache_folder`), which later runs with the
same fingerprint read. Several processes may share the folder (two categories trained at once,
anomalib's benchmark jobs, DDP ranks). Each writes only a file it holds the lock of: ``rank<r>``,
else ``rank<r>-1``, ``rank<r>-2``, ...; a file whose lock is free belongs to a finished (or
killed) run and is adopted, so sequential runs fill one file. The other files are read only, and
each of their entries is checked against its CRC on every read, since their writer may replace
it. The whole cache folder stays within a disk budget, least recently used fingerprints evicted
first; a full disk or the budget stops further spilling with one warning, never training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .cache_folder import CacheRoot, folder_bytes
from .dtypes import NUMPY_DTYPES
from .spill_file import CACHE_FORMAT_VERSION, DISK_FULL, SPILL_NAME, SpillFile, claim_spill_name

logger = logging.getLogger(__name__)

# The teacher as the cache calls it: images -> (shallow, deep) tokens, each (B, N, D).
Teacher = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as file:  # in 1-MiB chunks: a large image is never held whole in memory
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()[:32]


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


def tile_keys(keys: Sequence[str | None], tiles_per_image: int) -> list[str | None]:
    """One key per tile when each image is cut into ``tiles_per_image`` tiles (its tiles in a row).

    An image's key alone when it is not tiled; the fingerprint holds the tiling, so a tile's number
    names the same pixels in every run.

    Example:
        >>> tile_keys(["a", None], 2)
        ['a/0', 'a/1', None, None]
    """
    if tiles_per_image == 1:
        return list(keys)
    return [None if key is None else f"{key}/{tile}" for key in keys for tile in range(tiles_per_image)]


def process_memory_budget_mb(memory_budget_mb: float, world_size: int) -> float:
    """The memory budget of one process: none when several processes train together (DDP).

    Entries in one process's memory are invisible to the others, and Lightning's distributed sampler
    hands each process other images every epoch. On disk (kept hot by the operating system's page
    cache) every process of a machine finds what another one computed, so each image passes through
    the teacher once per fit, not once per process.

    Example:
        >>> process_memory_budget_mb(4096.0, world_size=1), process_memory_budget_mb(4096.0, world_size=8)
        (4096.0, 0.0)
    """
    if world_size > 1 and memory_budget_mb > 0:
        logger.info(
            "%d processes train together: cached features go to disk, where every process of the machine finds "
            "them, instead of %.0f MB of memory per process.",
            world_size,
            memory_budget_mb,
        )
        return 0.0
    return memory_budget_mb


class TeacherFeatureCache:
    """The teacher's shallow and deep tokens of each training image, kept between epochs.

    Entries are stacked ``(2, N, D)`` tensors in ``dtype``: in memory while they fit in
    ``memory_budget_mb``, then in this process's :class:`SpillFile` under
    ``directory/<fingerprint[:16]>/`` while the whole of ``directory`` fits in ``disk_budget_mb``
    (least recently used fingerprints that no process has open are evicted to make room).
    Entries that the other spill files there hold (those of earlier or concurrent runs) are
    read from them.

    Args:
        directory: Cache folder (see :class:`~.cache_folder.CacheRoot`).
        fingerprint: :func:`feature_fingerprint` of everything that shapes the features.
        dtype: Storage dtype, ``torch.float16`` (default) or ``torch.float32``.
        memory_budget_mb: Memory for entries before they spill to disk; ``0`` puts every entry on
            disk, where later runs with the same fingerprint find it.
        disk_budget_mb: Disk for the whole cache folder (every fingerprint, category and process);
            an entry beyond it is not cached (one warning). ``0`` keeps nothing on disk.
        rank: Global rank of the process, the start of its spill file's name.
        shared: The folder is shared by a group of users or nodes (see :mod:`.cache_folder`).
        about: What the features are (teacher, image size, ...), shown by ``transformer-student cache list``.

    Raises:
        OSError: The folder cannot be created, opened or trusted (a
            :class:`~.cache_folder.CacheFolderError` names the reason and the fix).

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

    # Without a fresh look at the folder, at most this many new slots are added (others' growth is seen late).
    RECOUNT_EVERY = 256
    # Bytes an entry's index line may take, counted with its data against the disk budget.
    LINE_BYTES = 192

    def __init__(
        self,
        directory: str | Path,
        fingerprint: str,
        dtype: torch.dtype = torch.float16,
        memory_budget_mb: float = 4096.0,
        disk_budget_mb: float = 20480.0,
        rank: int = 0,
        shared: bool = False,
        about: Mapping[str, Any] | None = None,
    ) -> None:
        if dtype not in NUMPY_DTYPES:
            msg = f"Cache dtype must be one of {[str(known) for known in NUMPY_DTYPES]}, got {dtype}."
            raise ValueError(msg)
        for name, budget in (("memory_budget_mb", memory_budget_mb), ("disk_budget_mb", disk_budget_mb)):
            if budget < 0:
                msg = f"feature_cache.{name} must be >= 0, got {budget}."
                raise ValueError(msg)
        self.dtype = dtype
        self.memory_budget_bytes = int(memory_budget_mb * 2**20)
        self.disk_budget_mb = disk_budget_mb
        self.disk_budget_bytes = int(disk_budget_mb * 2**20)
        self._fingerprint = fingerprint
        self._lock: int | None = None
        self._private = False
        self._folder = None
        self.spill: SpillFile | None = None
        self._others: dict[str, SpillFile] = {}
        self._memory: dict[str, torch.Tensor] = {}
        self._memory_bytes = 0
        self.root = CacheRoot(directory, shared)
        try:
            self._folder = self.root.fingerprint(fingerprint, dict(about or {}))
            self.folder = self._folder.path
            name, self._lock = claim_spill_name(self._folder, rank)
            # Without a lock (no flock here) the file is private, and the others cannot be told safe to read.
            self._private = self._lock is None
            self.spill = SpillFile(self._folder, name, fingerprint, dtype)
        except BaseException:
            self.close()
            raise
        self.refresh_others()
        self._spilling = True  # until the disk budget or a full disk refuses an entry
        self._disk_used: int | None = None  # bytes of the whole folder at the last count
        self._since_count = 0
        self.hits = 0
        self.misses = 0

    @property
    def others(self) -> list[SpillFile]:
        """The other processes' spill files of this fingerprint that hold entries, opened read-only."""
        return [spill for spill in self._others.values() if spill.entries]

    def refresh_others(self) -> None:
        """Take in what the other spill files of the folder gained since they were last read (O(new lines)).

        Other processes (DDP ranks, concurrent runs) may be writing theirs meanwhile: reading what they
        added on a miss lets one process find what another has just computed.
        """
        if self._private or self.spill is None:  # without a lock, the others cannot be told safe to read
            return
        try:
            names = list(self._folder.names(".log"))
        except OSError:  # the folder went away or cannot be read: what is known stays, nothing new is read
            return
        for name in names:
            if name == self.spill.name or not SPILL_NAME.match(name):
                continue
            known = self._others.pop(name, None)
            if known is not None:
                with contextlib.suppress(OSError):
                    if known.refresh():
                        self._others[name] = known
                        continue
                known.close()  # rebuilt or compacted by its owner: read it anew
            with contextlib.suppress(OSError):  # removed meanwhile, or not a file to trust: skipped
                self._others[name] = SpillFile(self._folder, name, self._fingerprint, self.dtype, writable=False)

    def __len__(self) -> int:
        return len(self._memory) + self.disk_entries

    @property
    def memory_bytes(self) -> int:
        """Bytes the entries in memory take (at most ``memory_budget_bytes``)."""
        return self._memory_bytes

    @property
    def disk_entries(self) -> int:
        """Number of distinct entries in the spill files: this process's and the others it reads."""
        own = self.spill.entries if self.spill is not None else {}
        return len(set(own).union(*(other.entries for other in self.others)))

    def get(self, key: str) -> torch.Tensor | None:
        """The ``(2, N, D)`` entry of ``key`` on the CPU in the storage dtype, or ``None``."""
        if key in self._memory:
            return self._memory[key]
        for spill in (self.spill, *self.others):
            try:
                row = spill.get(key)
            except OSError:  # an unreadable file is a miss, never a failed step
                row = None
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

    def _room_for(self, size: int) -> bool:
        """Whether a new slot of ``size`` bytes fits in the disk budget, evicting unused fingerprints if needed."""
        self._since_count += 1
        size += self.LINE_BYTES
        if (
            self._disk_used is None
            or self._since_count >= self.RECOUNT_EVERY
            or (self._disk_used + size > self.disk_budget_bytes)
        ):
            try:
                self._disk_used = self.root.make_room(size, self.disk_budget_bytes, keep=self._folder.name)
            except OSError as error:
                self._stop_spilling(f"its folder {self.root.path} cannot be read ({error})")
                return False
            self._since_count = 0
        if self._disk_used + size > self.disk_budget_bytes:
            self._stop_spilling(
                f"its disk budget of {self.disk_budget_mb:g} MB is reached ({self._disk_used / 2**20:.1f} MB used in "
                f"{self.root.path} by features in use, {size / 2**20:.1f} MB more needed per image in "
                f"{self.folder}). Raise feature_cache.disk_budget_mb (--model.feature_cache.disk_budget_mb), or "
                "see what takes the room with `transformer-student cache list`"
            )
            return False
        self._disk_used += size
        return True

    def _spill(self, key: str, entry: torch.Tensor, size: int) -> None:
        """Write an entry to this process's spill file, unless the disk budget or the disk refuses it."""
        if self.spill.needs_new_slot and not self._room_for(size):
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
            if error.errno in DISK_FULL:
                free = shutil.disk_usage(self.folder).free
                reason = (
                    f"the disk of {self.folder} is full ({free / 2**20:.1f} MB free, {size / 2**20:.1f} MB needed "
                    "per image). Free space there, or point feature_cache.dir (--model.feature_cache.dir) to a "
                    "larger disk"
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
        compute: Teacher,
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
        if any(entry is None and key is not None for entry, key in zip(cached, keys, strict=True)):
            self.refresh_others()
            cached = [
                entry if entry is not None or key is None else self.get(key)
                for entry, key in zip(cached, keys, strict=True)
            ]
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
        on_disk = folder_bytes(self.folder) if self.spill is not None else 0
        return (
            f"{len(self)} images cached ({len(self._memory)} in memory, {self.disk_entries} on disk), "
            f"{self.hits} hits, {self.misses} misses; {on_disk / 2**20:.1f} MB on disk in "
            f"{self.folder} (budget {self.disk_budget_mb:g} MB for {self.root.path})"
        )

    def close(self) -> None:
        """Free the memory entries, close the spill files (which stay for later runs) and release the locks.

        Safe to call more than once, and on a cache whose opening failed half way.
        """
        self._memory.clear()
        self._memory_bytes = 0
        for spill in self._others.values():
            spill.close()
        self._others.clear()
        if self.spill is not None:
            if self._private:  # nobody would ever read it again
                self.spill.remove_files()
            self.spill.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self._folder is not None:
            self._folder.close()
        self.root.close()
