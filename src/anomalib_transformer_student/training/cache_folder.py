"""The teacher-feature cache's folder: private by default, shared on request, trusting nothing it did not write.

Layout::

    <cache_dir>/                        0700 (shared: 2770)
      <fingerprint[:16]>/               one folder per fingerprint (teacher, weights, size, layers, dtype, ...)
        about.json                      what the features are, for ``transformer-student cache list``
        in-use.lock                     held shared by every open cache; taken exclusively to evict or clear
        rank0.lock rank0.bin rank0.log  one writer's spill file (see :mod:`.spill_file`)

Every file is opened relative to its folder's descriptor and without following a symbolic link;
what is opened must be a regular file (a FIFO or a device is refused, never read). A private
folder (the default) must belong to the user and be writable by nobody else; its files are 0600.
A shared folder (``shared=True``, for several users of one group or several nodes) accepts other
users' folders and files, and makes its own group-writable (2770 and 0660), so that every member
of the group can lock, read and adopt them.

The folder as a whole stays within a disk budget: when an entry needs room, the fingerprints used
least recently and open in no process (their ``in-use.lock`` free) are removed first. Removal
renames a fingerprint folder away while holding its lock exclusively, so a process that opens it
meanwhile notices (its lock is on a file no longer at its path) and starts afresh.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no locks, so nothing is ever evicted or cleared while it might be in use
    fcntl = None

FILE_MODES = {False: 0o600, True: 0o660}
FOLDER_MODES = {False: 0o700, True: 0o2770}
IN_USE = "in-use.lock"
ABOUT = "about.json"
TRASH_PREFIX = ".trash-"
MAX_ABOUT_BYTES = 1 << 16
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class CacheFolderError(OSError):
    """The cache folder (or a file in it) is not one to trust or use; the message says why and what to do."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/anomalib_transformer_student/teacher_features`` (``~/.cache/...`` by default)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "anomalib_transformer_student" / "teacher_features"


def folder_bytes(folder: str | Path | int) -> int:
    """Bytes of the regular files directly in ``folder`` (a path or a descriptor); files that vanish are skipped.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "a").write_bytes(b"123")
        >>> folder_bytes(folder)
        3
    """
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                status = entry.stat(follow_symlinks=False)
                total += status.st_size if stat.S_ISREG(status.st_mode) else 0
    return total


def _refuse(path: object, problem: str) -> CacheFolderError:
    return CacheFolderError(
        f"Teacher-feature cache folder '{path}' {problem}. Point feature_cache.dir (--model.feature_cache.dir) "
        "to a folder of your own, or set feature_cache.shared=True (--model.feature_cache.shared true) if this "
        "folder is meant to be shared by a group of users or nodes."
    )


def _owned_by_me(status: os.stat_result) -> bool:
    """Whether this process's user owns the file (always, where there are no user ids)."""
    return not hasattr(os, "getuid") or status.st_uid == os.getuid()


def check_trusted(status: os.stat_result, path: object, shared: bool) -> None:
    """Refuse a folder that another user owns or that others can write to, unless it is ``shared``.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()  # mkdtemp makes a 0700 folder of the user
        >>> check_trusted(os.stat(folder), folder, shared=False)
    """
    if not stat.S_ISDIR(status.st_mode):
        raise _refuse(path, "is not a folder")
    if shared:
        return
    if not _owned_by_me(status):
        raise _refuse(path, f"belongs to another user (uid {status.st_uid})")
    if status.st_mode & 0o022:
        raise _refuse(path, f"is writable by other users (mode {stat.S_IMODE(status.st_mode):o})")


def open_regular_file(name: str, dir_fd: int, *, write: bool, create: bool, shared: bool) -> int:
    """A descriptor of the regular file ``name`` in the folder ``dir_fd``, never through a symbolic link.

    A created file (or, in a private folder, any file of the user's opened to write) gets the folder's
    file mode (0600, shared 0660) whatever the umask. Raises ``OSError`` (``ELOOP`` for a link) or
    :class:`CacheFolderError` for something that is not a regular file, or, in a private folder, a file of
    another user.
    """
    flags = _NOFOLLOW | _CLOEXEC | _NONBLOCK | (os.O_RDWR if write else os.O_RDONLY)
    flags |= os.O_CREAT if create else 0
    descriptor = os.open(name, flags, FILE_MODES[shared], dir_fd=dir_fd)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise CacheFolderError(f"Teacher-feature cache file '{name}' is not a regular file; it is ignored.")
        mine = _owned_by_me(status)
        if not mine and not shared:
            raise CacheFolderError(f"Teacher-feature cache file '{name}' belongs to another user; it is ignored.")
        if mine and (write or create) and stat.S_IMODE(status.st_mode) != FILE_MODES[shared]:
            os.fchmod(descriptor, FILE_MODES[shared])
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _open_folder(name: str | Path, shared: bool, dir_fd: int | None = None) -> int:
    """Create (with the folder mode) or open a folder and check that it can be trusted; its descriptor."""
    created = False
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, FOLDER_MODES[shared], dir_fd=dir_fd)
        created = True
    # The cache_dir itself may be a link the user made (dir_fd None); a fingerprint folder never is.
    flags = os.O_RDONLY | _DIRECTORY | _CLOEXEC | (0 if dir_fd is None else _NOFOLLOW)
    descriptor = os.open(name, flags, dir_fd=dir_fd)
    try:
        status = os.fstat(descriptor)
        mine = _owned_by_me(status)
        if created and mine:  # the folder mode, whatever the umask
            os.fchmod(descriptor, FOLDER_MODES[shared])
            status = os.fstat(descriptor)
        check_trusted(status, name, shared)
        if mine and not shared and stat.S_IMODE(status.st_mode) & 0o077:
            os.fchmod(descriptor, FOLDER_MODES[False])  # readable by others (as older versions left it): private
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _lock(descriptor: int, exclusive: bool, wait: bool) -> bool:
    """``flock`` the descriptor; ``False`` when another process holds a conflicting lock (and ``wait`` is off).

    Raises ``OSError`` where there are no locks (Windows, a filesystem without them).
    """
    if fcntl is None:
        raise OSError(errno.ENOLCK, "no file locks on this system")
    operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
    try:
        fcntl.flock(descriptor, operation)
    except BlockingIOError:
        return False
    return True


def _same_file(descriptor: int, name: str, dir_fd: int | None) -> bool:
    """Whether ``name`` (not followed if a link) is still the file ``descriptor`` holds."""
    try:
        status = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (status.st_dev, status.st_ino) == (held.st_dev, held.st_ino)


@dataclass
class FingerprintUsage:
    """One fingerprint folder as ``transformer-student cache list`` shows it.

    Example:
        >>> FingerprintUsage("0123456789abcdef", 2**20, 0.0, {"teacher": "t"}).megabytes
        1.0
    """

    name: str
    bytes: int
    last_used: float
    about: dict[str, Any] = field(default_factory=dict)
    in_use: bool | None = None

    @property
    def megabytes(self) -> float:
        """Size in MiB."""
        return self.bytes / 2**20


class CacheRoot:
    """The cache folder (``cache_dir``): its fingerprint folders, their use and removal.

    Args:
        path: The folder; created (0700, shared 2770) if missing.
        shared: Accept a folder of another user or one writable by a group (see the module's notes).

    Raises:
        CacheFolderError: The folder cannot be trusted (and ``shared`` is off).
        OSError: It cannot be created or opened.

    Example:
        >>> import tempfile
        >>> root = CacheRoot(Path(tempfile.mkdtemp()) / "cache")
        >>> with root.fingerprint("0123456789abcdef0123", {"teacher": "t"}) as folder:
        ...     folder.path.name, oct(os.stat(folder.path).st_mode & 0o777)
        ('0123456789abcdef', '0o700')
        >>> [usage.name for usage in root.usage()]
        ['0123456789abcdef']
        >>> root.clear(), root.usage()
        (['0123456789abcdef'], [])
        >>> root.close()
    """

    def __init__(self, path: str | Path, shared: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.shared = shared
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = _open_folder(self.path, shared)

    def fingerprint(self, fingerprint: str, about: dict[str, Any] | None = None) -> FingerprintFolder:
        """Open (creating it if needed) the folder of ``fingerprint``, marked in use until it is closed."""
        return FingerprintFolder(self, fingerprint[:16], about or {})

    def _folder_names(self) -> list[str]:
        with os.scandir(self.fd) as entries:
            return sorted(
                entry.name
                for entry in entries
                if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False)
            )

    def usage(self, check_in_use: bool = False) -> list[FingerprintUsage]:
        """Every fingerprint folder with its size, last use and description, least recently used first."""
        found = []
        for name in self._folder_names():
            with contextlib.suppress(OSError):  # removed meanwhile, or not ours to read
                found.append(self._usage_of(name, check_in_use))
        return sorted(found, key=lambda usage: usage.last_used)

    def _usage_of(self, name: str, check_in_use: bool) -> FingerprintUsage:
        folder = os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=self.fd)
        try:
            total = folder_bytes(folder)
            try:
                last_used = os.stat(IN_USE, dir_fd=folder, follow_symlinks=False).st_mtime
            except OSError:  # not yet created, or removed meanwhile: the folder's own time
                last_used = os.fstat(folder).st_mtime
            in_use = None
            if check_in_use:
                with contextlib.suppress(OSError):
                    lock = open_regular_file(IN_USE, folder, write=False, create=False, shared=self.shared)
                    try:
                        in_use = not _lock(lock, exclusive=True, wait=False)
                    finally:
                        os.close(lock)
            return FingerprintUsage(name, total, last_used, _read_about(folder), in_use)
        finally:
            os.close(folder)

    def total_bytes(self) -> int:
        """Bytes of all fingerprint folders together."""
        return sum(usage.bytes for usage in self.usage())

    def remove(self, name: str) -> bool:
        """Remove the fingerprint folder ``name`` unless a process has it open; whether it was removed."""
        try:
            folder = os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        try:
            lock = open_regular_file(IN_USE, folder, write=False, create=True, shared=True)
        except OSError:
            os.close(folder)
            return False
        try:
            if not _lock(lock, exclusive=True, wait=False):
                return False
            trash = f"{TRASH_PREFIX}{uuid.uuid4().hex}"
            os.rename(name, trash, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError:
            return False
        finally:
            os.close(lock)
            os.close(folder)
        shutil.rmtree(trash, dir_fd=self.fd, ignore_errors=True)
        return True

    def clear(self, older_than_days: float | None = None) -> list[str]:
        """Remove every fingerprint folder no process uses (and, if given, unused for ``older_than_days``)."""
        limit = None if older_than_days is None else time.time() - older_than_days * 86400
        self._remove_trash()
        return [
            usage.name
            for usage in self.usage()
            if (limit is None or usage.last_used < limit) and self.remove(usage.name)
        ]

    def make_room(self, needed: int, budget: int, keep: str) -> int:
        """Evict least recently used fingerprint folders (not ``keep``, none in use) until ``needed`` bytes fit.

        Returns the bytes in use afterwards.
        """
        usages = self.usage()
        used = sum(usage.bytes for usage in usages)
        for usage in usages:
            if used + needed <= budget:
                break
            if usage.name != keep and self.remove(usage.name):
                used -= usage.bytes
        return used

    def _remove_trash(self) -> None:
        """Finish removals that a killed process left half done."""
        with os.scandir(self.fd) as entries:
            names = [entry.name for entry in entries if entry.name.startswith(TRASH_PREFIX)]
        for name in names:
            shutil.rmtree(name, dir_fd=self.fd, ignore_errors=True)

    def close(self) -> None:
        """Close the folder's descriptor."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_about(folder: int) -> dict[str, Any]:
    """The description of a fingerprint folder (bounded, parsed as untrusted text; ``{}`` if unusable)."""
    try:
        descriptor = open_regular_file(ABOUT, folder, write=False, create=False, shared=True)
    except OSError:
        return {}
    with os.fdopen(descriptor, "rb") as file:
        text = file.read(MAX_ABOUT_BYTES + 1)
    try:
        about = json.loads(text) if len(text) <= MAX_ABOUT_BYTES else {}
    except ValueError:
        return {}
    return about if isinstance(about, dict) else {}


class FingerprintFolder:
    """One fingerprint's folder, open (its ``in-use.lock`` held shared) until :meth:`close`.

    A folder that is removed while it is being opened (see :meth:`CacheRoot.remove`) is opened again.
    """

    def __init__(self, root: CacheRoot, name: str, about: dict[str, Any]) -> None:
        self.root = root
        self.name = name
        self.shared = root.shared
        self.path = root.path / name
        for _ in range(8):
            self.fd = _open_folder(name, root.shared, dir_fd=root.fd)
            self._lock = open_regular_file(IN_USE, self.fd, write=False, create=True, shared=root.shared)
            with contextlib.suppress(OSError):  # no locks here: nothing is ever evicted in use, see remove
                _lock(self._lock, exclusive=False, wait=True)
            if _same_file(self.fd, name, root.fd) and _same_file(self._lock, IN_USE, self.fd):
                break
            self._close_descriptors()  # removed while we opened it: open the new one
        else:
            raise CacheFolderError(f"Teacher-feature cache folder '{self.path}' keeps being removed while it opens.")
        self.touch()
        if about:
            self._write_about(about)

    def _write_about(self, about: dict[str, Any]) -> None:
        with contextlib.suppress(FileExistsError):
            descriptor = os.open(
                ABOUT,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC,
                FILE_MODES[self.shared],
                dir_fd=self.fd,
            )
            with os.fdopen(descriptor, "w") as file:
                json.dump(about, file, default=repr)

    def touch(self) -> None:
        """Record a use now (the ``in-use.lock`` file's modification time)."""
        with contextlib.suppress(OSError):  # another user's file in a shared folder: leave its time
            os.utime(self._lock)

    def open_file(self, name: str, *, write: bool, create: bool = False) -> int:
        """See :func:`open_regular_file`."""
        return open_regular_file(name, self.fd, write=write, create=create, shared=self.shared)

    def names(self, suffix: str) -> Iterator[str]:
        """Names (without ``suffix``) of the regular files in the folder ending with ``suffix``."""
        with os.scandir(self.fd) as entries:
            found = [entry.name for entry in entries if entry.name.endswith(suffix)]
        for name in sorted(found):
            yield name[: -len(suffix)]

    def unlink(self, name: str) -> None:
        """Remove ``name`` (a link is removed, not followed); no error if it is gone."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def replace(self, source: str, target: str) -> None:
        """Atomically rename ``source`` to ``target`` within the folder."""
        os.replace(source, target, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def _close_descriptors(self) -> None:
        for descriptor in (getattr(self, "_lock", -1), getattr(self, "fd", -1)):
            if descriptor >= 0:
                os.close(descriptor)
        self._lock = self.fd = -1

    def close(self) -> None:
        """Record the use and release the folder (it may be evicted from now on)."""
        if self.fd >= 0:
            self.touch()
            self._close_descriptors()

    def __enter__(self) -> FingerprintFolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
