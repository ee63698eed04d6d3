"""The cache folder and its run folders: what the cache may create, trust and remove.

The folder holds ``.tsfc-budget.lock`` (taken around every disk-budget check and spill), one ``tsfc-<16 hex>/``
folder per run (``in-use.lock``, held shared while in use; ``about.json``, the record; ``rank<N>.bin/.log``) and
``.tsfc-trash-<16 hex>/`` folders being removed (docs/how-to/feature-cache.md). A folder is removed only when its
name is the cache's, its record parses and its lock is free; after locking, the name must still be the locked
folder. Removal unlinks only the names the cache writes, then ``rmdir``s. No symbolic link is followed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

FORMAT = "anomalib_transformer_student.feature_cache/1"
BUDGET_LOCK = ".tsfc-budget.lock"
IN_USE = "in-use.lock"
ABOUT = "about.json"
RUN = re.compile(r"tsfc-[0-9a-f]{16}\Z")
TRASH = re.compile(r"\.tsfc-trash-[0-9a-f]{16}\Z")
SPILL = re.compile(r"rank(\d{1,5})\.(bin|log)\Z")
MAX_ABOUT_BYTES = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class CacheFolderError(OSError):
    """A folder or file the cache will not use; the message names it and the fix."""


def _refuse(path: object, problem: str) -> CacheFolderError:
    return CacheFolderError(
        f"Teacher-feature cache folder '{path}' {problem}. Point feature_cache.dir (--model.feature_cache.dir, "
        "--cache-dir) to an empty or missing folder of your own (it is created 0700), or set feature_cache=False."
    )


def _same(descriptor: int, name: str, dir_fd: int) -> bool:
    """Whether ``name`` in ``dir_fd`` (not followed) is still the file ``descriptor`` holds."""
    try:
        named = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def open_file(name: str, dir_fd: int, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the user's regular file ``name`` in ``dir_fd`` (created 0600 with ``O_CREAT``), no link."""
    descriptor = os.open(name, flags | _FILE_FLAGS, 0o600, dir_fd=dir_fd)
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_uid != os.getuid():
        os.close(descriptor)
        raise CacheFolderError(f"Teacher-feature cache file '{name}' is not a regular file of the user's.")
    return descriptor


def read_about(folder: int) -> dict[str, Any] | None:
    """The folder's record if it is one the cache wrote (bounded, flat, of the format), else ``None``."""
    try:
        descriptor = open_file(ABOUT, folder)
        try:
            text = os.read(descriptor, MAX_ABOUT_BYTES + 1)
        finally:
            os.close(descriptor)
        about = json.loads(text) if len(text) <= MAX_ABOUT_BYTES else None
    except Exception:  # any damage, nesting included, means: not a record
        return None
    flat = isinstance(about, dict) and all(isinstance(value, str | int | float | bool) for value in about.values())
    return about if flat and about.get("format") == FORMAT and isinstance(about.get("created"), int | float) else None


def _lock(descriptor: int, exclusive: bool, wait: bool = False) -> bool:
    try:
        fcntl.flock(descriptor, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _empty_folder(parent: int, name: str, folder: int) -> bool:
    """Unlink the names the cache writes in ``folder``, then remove it; ``False`` (folder kept) if more is there."""
    with os.scandir(folder) as entries:
        names = [entry.name for entry in entries]
    foreign = [n for n in names if not (SPILL.match(n) or n in (IN_USE, ABOUT, ABOUT + ".tmp"))]
    if foreign:
        logger.warning("Teacher-feature cache: '%s' holds files it did not write (%s); left in place.", name, foreign)
        return False
    for known in sorted(names, key=lambda n: n == ABOUT):  # the record last: a killed removal stays recognised
        with contextlib.suppress(FileNotFoundError):
            os.unlink(known, dir_fd=folder)
    try:
        os.rmdir(name, dir_fd=parent)
    except OSError:
        return False
    return True


class FolderUsage(NamedTuple):
    """One folder as ``transformer-student cache list`` shows it: name, bytes, record (``None``: not the cache's)."""

    name: str
    bytes: int
    about: dict[str, Any] | None
    in_use: bool


class CacheRoot:
    """The cache folder, checked: a real folder of the user's, writable by nobody else, holding only cache folders.

    Args:
        path: The folder.
        create: Create it (0700) if missing, and the budget lock file; ``False`` (``cache list|clear``) changes
            nothing.

    Raises:
        CacheFolderError: The folder is a link, not a folder, another user's, writable by others, or holds
            something the cache did not make.

    Example:
        >>> import tempfile
        >>> root = CacheRoot(Path(tempfile.mkdtemp()) / "cache")
        >>> run = root.create_run({"purpose": "training"})
        >>> [usage.in_use for usage in root.usage()], run.remove(), root.usage()
        ([True], None, [])
    """

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        created = False
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.path, 0o700)
                created = True
        try:
            self.fd = os.open(self.path, _DIR_FLAGS)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _refuse(self.path, "is a symbolic link or not a folder") from error
            raise
        try:
            if created:
                os.fchmod(self.fd, 0o700)  # whatever the umask
            status = os.fstat(self.fd)
            if status.st_uid != os.getuid():
                raise _refuse(self.path, f"belongs to another user (uid {status.st_uid})")
            if status.st_mode & 0o022:
                raise _refuse(self.path, f"is writable by other users (mode {stat.S_IMODE(status.st_mode):o})")
            foreign = sorted(n for n in os.listdir(self.fd) if not (RUN.match(n) or TRASH.match(n) or n == BUDGET_LOCK))
            if foreign:
                raise _refuse(self.path, f"holds files the cache did not make ({', '.join(foreign[:3])})")
        except BaseException:
            self.close()
            raise
        self._budget_lock = open_file(BUDGET_LOCK, self.fd, os.O_RDONLY | os.O_CREAT) if create else -1

    def _folders(self, pattern: re.Pattern[str] | None = None) -> list[str]:
        """Names of the run (or ``pattern``'s) folders, links excluded."""
        with os.scandir(self.fd) as entries:
            folders = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        return sorted(n for n in folders if (pattern.match(n) if pattern else RUN.match(n) or TRASH.match(n)))

    @contextlib.contextmanager
    def _open(self, name: str) -> Iterator[int]:
        folder = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        try:
            yield folder
        finally:
            os.close(folder)

    @contextlib.contextmanager
    def budget(self) -> Iterator[int]:
        """The bytes all cache folders take, while holding the budget lock (no other process spills meanwhile)."""
        _lock(self._budget_lock, exclusive=True, wait=True)
        try:
            yield self.used_bytes()
        finally:
            fcntl.flock(self._budget_lock, fcntl.LOCK_UN)

    def used_bytes(self) -> int:
        """Bytes of the regular files in every run and trash folder."""
        return sum(self._bytes(name) for name in self._folders())

    def _bytes(self, name: str) -> int:
        sizes = [0]
        with contextlib.suppress(OSError), self._open(name) as folder:
            for entry in os.listdir(folder):
                with contextlib.suppress(OSError):
                    status = os.stat(entry, dir_fd=folder, follow_symlinks=False)
                    sizes.append(status.st_size if stat.S_ISREG(status.st_mode) else 0)
        return sum(sizes)

    def create_run(self, about: Mapping[str, Any]) -> RunFolder:
        """A new run folder, in use until closed; stale folders of killed runs are removed first."""
        self.sweep()
        return RunFolder(self, f"tsfc-{secrets.token_hex(8)}", about)

    def remove_if_unused(self, name: str) -> bool:
        """Remove the run folder ``name`` if its record is the cache's and no process uses it."""
        trash, lock = name.replace("tsfc-", ".tsfc-trash-"), -1
        try:
            with self._open(name) as folder:
                if read_about(folder) is None or os.fstat(folder).st_uid != os.getuid():
                    return False
                with contextlib.suppress(FileNotFoundError):  # absent only in a removal killed half way
                    lock = open_file(IN_USE, folder)
                free = lock < 0 or (_lock(lock, exclusive=True) and _same(lock, IN_USE, folder))
                if not (free and _same(folder, name, self.fd)):  # the name still is the folder locked
                    return False
                os.rename(name, trash, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                return _empty_folder(self.fd, trash, folder)
        except OSError:
            return False
        finally:
            if lock >= 0:
                os.close(lock)

    def sweep(self, older_than: float | None = None) -> list[str]:
        """Remove trash and unused run folders (created before ``older_than``, a time, if given); names removed."""
        removed = []
        for name in self._folders(TRASH):
            with contextlib.suppress(OSError), self._open(name) as folder:
                if (read_about(folder) is not None or not os.listdir(folder)) and _empty_folder(self.fd, name, folder):
                    removed.append(name)
        for usage in self.usage():
            created = usage.about["created"] if usage.about and RUN.match(usage.name) else None
            old = created is not None and (older_than is None or created < older_than)
            if old and not usage.in_use and self.remove_if_unused(usage.name):
                removed.append(usage.name)
        return removed

    def usage(self) -> list[FolderUsage]:
        """Every run and trash folder with its size, record (``None``: unrecognised) and whether it is in use."""
        found = []
        for name in self._folders():
            about, in_use = None, False
            with contextlib.suppress(OSError), self._open(name) as folder:
                about = read_about(folder)
                lock = open_file(IN_USE, folder)
                in_use = not _lock(lock, exclusive=True)
                os.close(lock)
            found.append(FolderUsage(name, self._bytes(name), about, in_use))
        return found

    def close(self) -> None:
        """Close the folder's descriptors."""
        for descriptor in (getattr(self, "_budget_lock", -1), self.fd):
            if descriptor >= 0:
                os.close(descriptor)
        self._budget_lock = self.fd = -1


class RunFolder:
    """One run's folder, in use (``in-use.lock`` held shared) until :meth:`release` or :meth:`remove`.

    Made with its record (:meth:`CacheRoot.create_run`), or, with ``create=False``, an existing one opened if its
    record holds ``about`` (another rank's, or one released after a fit).

    Example:
        >>> import tempfile
        >>> run = CacheRoot(tempfile.mkdtemp()).create_run({"purpose": "evaluation"})
        >>> sorted(os.listdir(run.path)), run.about["purpose"], run.remove(), os.path.exists(run.path)
        (['about.json', 'in-use.lock'], 'evaluation', None, False)
    """

    def __init__(self, root: CacheRoot, name: str, about: Mapping[str, Any], create: bool = True) -> None:
        if not RUN.match(name):
            raise CacheFolderError(f"'{name}' is not a teacher-feature cache folder name.")
        self.root, self.name, self.path = root, name, root.path / name
        self.fd = self._lock = -1
        if create:
            os.mkdir(name, 0o700, dir_fd=root.fd)
        try:
            self.fd = os.open(name, _DIR_FLAGS, dir_fd=root.fd)
            if create:
                os.fchmod(self.fd, 0o700)
            self._lock = open_file(IN_USE, self.fd, os.O_RDONLY | (os.O_CREAT | os.O_EXCL if create else 0))
            _lock(self._lock, exclusive=False, wait=True)  # a remover holds it exclusively only briefly
            if not (_same(self.fd, name, root.fd) and _same(self._lock, IN_USE, self.fd)):
                raise CacheFolderError(f"Teacher-feature cache folder '{self.path}' was removed while it opened.")
            if create:
                record = {"format": FORMAT, **about, "pid": os.getpid(), "host": socket.gethostname()}
                self._write_about({**record, "created": time.time()})
            found = read_about(self.fd)
            if found is None or any(found.get(key) != value for key, value in about.items()):
                raise CacheFolderError(f"Teacher-feature cache folder '{self.path}' is not the one expected.")
            self.about = found
        except BaseException:
            self.remove() if create else self.release()  # nothing left open or half-written
            raise

    def _write_about(self, about: Mapping[str, Any]) -> None:
        descriptor = open_file(ABOUT + ".tmp", self.fd, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            data = json.dumps(about).encode()
            if os.write(descriptor, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
        finally:
            os.close(descriptor)
        os.rename(ABOUT + ".tmp", ABOUT, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def spill_ranks(self) -> list[int]:
        """Ranks whose index file is in the folder."""
        with contextlib.suppress(OSError):
            return sorted(int(m.group(1)) for m in map(SPILL.match, os.listdir(self.fd)) if m and m.group(2) == "log")
        return []

    def release(self) -> None:
        """Stop using the folder; it stays (until removed, or swept as unused by a later run)."""
        for descriptor in (self._lock, self.fd):
            if descriptor >= 0:
                os.close(descriptor)
        self._lock = self.fd = -1

    def remove(self) -> None:
        """Delete the files the cache wrote and the folder (a folder holding anything else stays), then release."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                trash = self.name.replace("tsfc-", ".tsfc-trash-")
                if _same(self.fd, self.name, self.root.fd):
                    os.rename(self.name, trash, src_dir_fd=self.root.fd, dst_dir_fd=self.root.fd)
                    _empty_folder(self.root.fd, trash, self.fd)
        self.release()
