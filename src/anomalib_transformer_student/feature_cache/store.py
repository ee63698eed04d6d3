"""The teacher's tokens of one run, per image key: in memory up to a budget, then in this rank's spill file.

Keys are the SHA-256 of an image file's bytes (:class:`ImageKeys`), ``<key>/<tile>`` with tiling. On a miss the
store also reads the other ranks' spill files of the run folder: in DDP the teacher runs once per image.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .run_folder import CacheRoot, RunFolder
from .spill_file import DamagedSpillFile, SpillFile

logger = logging.getLogger(__name__)


Teacher = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images -> (shallow, deep), each (B, N, D)
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def image_key(path: str | os.PathLike[str]) -> str | None:
    """The first 32 hex digits of the SHA-256 of the file's bytes, or ``None`` if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()[:32]


class ImageKeys:
    """:func:`image_key` remembered per file state (size, times, inode), so each image is hashed once per run.

    Example:
        >>> ImageKeys()("no/such/image.png") is None
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


class FeatureStore:
    """Stacked ``(2, N, D)`` teacher tokens per key, for one run folder and one rank.

    ``disk_budget_mb`` covers the whole cache folder (``root``), checked under its lock before each entry is
    written: with ``0``, or an entry larger than what is left, nothing more goes to disk and nothing is removed.

    Example:
        >>> import tempfile
        >>> root = CacheRoot(tempfile.mkdtemp())
        >>> store = FeatureStore(root, root.create_run({}), memory_budget_mb=0)
        >>> teacher = lambda x: (x.flatten(2).mT, x.flatten(2).mT * 2)
        >>> images = torch.randn(2, 3, 4, 4)
        >>> _, (_, deep) = store.tokens(["a", "b"], images, teacher), store.tokens(["b", "a"], images.flip(0), teacher)
        >>> store.hits, store.misses, torch.equal(deep, teacher(images.flip(0))[1].half().float()), store.close()
        (2, 2, True, None)
    """

    def __init__(
        self,
        root: CacheRoot,
        folder: RunFolder,
        rank: int = 0,
        dtype: str = "float16",
        memory_budget_mb: float = 4096.0,
        disk_budget_mb: float = 20480.0,
    ) -> None:
        self.root, self.folder, self.rank, self.dtype = root, folder, rank, dtype
        self.memory_budget_bytes = int(memory_budget_mb * 2**20)
        self.disk_budget_bytes = int(disk_budget_mb * 2**20)
        self.memory: dict[str, torch.Tensor] = {}
        self.memory_bytes = 0
        self.spill = SpillFile(folder, rank, dtype, writable=True)
        self._others: dict[int, SpillFile | None] = {}  # None: skipped (damaged or unreadable)
        self._spilling = True
        self.hits = self.misses = 0

    def _refresh_others(self) -> None:
        for rank in self.folder.spill_ranks():
            if rank == self.rank:
                continue
            other = self._others.get(rank, ...)
            try:
                if other is ...:
                    self._others[rank] = SpillFile(self.folder, rank, self.dtype)
                elif other is not None:
                    other.refresh()
            except (OSError, DamagedSpillFile) as error:
                logger.warning(
                    "Teacher-feature cache: skipping rank %d's file in %s (%s).", rank, self.folder.name, error
                )
                if isinstance(other, SpillFile):
                    other.close()
                self._others[rank] = None

    def get(self, key: str) -> torch.Tensor | None:
        """The entry of ``key`` on the CPU, or ``None``."""
        if key in self.memory:
            return self.memory[key]
        rows = (spill.get(key) for spill in (self.spill, *self._others.values()) if spill is not None)
        row = next((row for row in rows if row is not None), None)
        return None if row is None else torch.from_numpy(row)

    def put(self, key: str, features: torch.Tensor) -> None:
        """Keep a ``(2, N, D)`` entry: in memory while the budget allows, else on disk while that allows."""
        entry = features.detach().to(device="cpu", dtype=TORCH_DTYPES[self.dtype]).contiguous()
        size = entry.numel() * entry.element_size()
        if key not in self.memory and self.memory_bytes + size <= self.memory_budget_bytes:
            self.memory_bytes, self.memory[key] = self.memory_bytes + size, entry
        elif self._spilling and key not in self.spill.entries:
            self._spill(key, entry, size)

    def _spill(self, key: str, entry: torch.Tensor, size: int) -> None:
        try:
            with self.root.budget() as used:
                if used + size + 256 > self.disk_budget_bytes:
                    self._stop(
                        f"its disk budget of {self.disk_budget_bytes / 2**20:g} MB is reached ({used / 2**20:.1f} MB "
                        f"used in {self.root.path}, {size / 2**20:.1f} MB needed per image). Raise "
                        "feature_cache.disk_budget_mb (--model.feature_cache.disk_budget_mb)"
                    )
                    return
                self.spill.put(key, entry.numpy())
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(self.folder.path).free / 2**20
                self._stop(
                    f"the disk of {self.folder.path} is full ({free:.1f} MB free, {size / 2**20:.1f} MB needed per "
                    "image). Free space there, or point feature_cache.dir (--model.feature_cache.dir) to a larger disk"
                )
            else:
                self._stop(f"writing to {self.folder.path} failed ({error})")

    def _stop(self, reason: str) -> None:
        self._spilling = False
        logger.warning("Teacher-feature cache: %s. Further images are not cached; the teacher computes them.", reason)

    def flush(self) -> None:
        """Move the entries in memory to disk (as the budgets allow) and free the memory."""
        for key, entry in self.memory.items():
            if self._spilling and key not in self.spill.entries:
                self._spill(key, entry, entry.nbytes)
        self.memory.clear()
        self.memory_bytes = 0

    def tokens(
        self, keys: Sequence[str | None], images: torch.Tensor, compute: Teacher
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shallow and deep tokens of a batch, computing (and keeping) only the entries not stored.

        Freshly computed rows are rounded to the storage dtype, so every epoch trains on the same values.
        """
        cached = [None if key is None else self.get(key) for key in keys]
        if any(entry is None and key is not None for entry, key in zip(cached, keys, strict=True)):
            self._refresh_others()
            cached = [e if e is not None or k is None else self.get(k) for e, k in zip(cached, keys, strict=True)]
        missing = [index for index, entry in enumerate(cached) if entry is None]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if len(missing) == len(keys):  # layout (2, B, N, D): shallow and deep tokens each contiguous
            features = torch.stack(compute(images))
            features = features.to(TORCH_DTYPES[self.dtype]).to(features.dtype)
        else:
            fresh = torch.stack(compute(images[missing])) if missing else None
            dtype = torch.float32 if fresh is None else fresh.dtype
            rows = [entry.to(images.device, dtype) if entry is not None else None for entry in cached]
            for row, index in enumerate(missing):
                rows[index] = fresh[:, row].to(TORCH_DTYPES[self.dtype]).to(dtype)
            features = torch.stack(rows, dim=1)
        for index in missing:
            if keys[index] is not None:
                self.put(keys[index], features[:, index])
        return features[0], features[1]

    def close(self, remove: bool = True) -> None:
        """Free the memory and close the files; remove the run folder, or (``remove=False``) only release it."""
        self.memory.clear()
        self.memory_bytes = 0
        for spill in (self.spill, *self._others.values()):
            if spill is not None:
                spill.close()
        self._others.clear()
        self.folder.remove() if remove else self.folder.release()
        self.root.close()
