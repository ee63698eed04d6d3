"""The cache folder's checks, run folders, and what may be removed (only what the cache made)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from anomalib_transformer_student.feature_cache import run_folder
from anomalib_transformer_student.feature_cache.run_folder import CacheFolderError, CacheRoot


def snapshot(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path below ``folder`` with its mode and, for files, its bytes."""
    found = {".": (os.lstat(folder).st_mode, None)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = (os.lstat(path).st_mode, path.read_bytes() if path.is_file() else None)
    return found


def user_files(folder: Path) -> Path:
    (folder / "thesis" / "sub").mkdir(parents=True)
    (folder / "thesis" / "chapter1.tex").write_text("important")
    (folder / "tsfc-0123456789abcdef").mkdir()  # a user's folder with the cache's kind of name, no record
    (folder / "notes.txt").write_text("x")
    folder.chmod(0o755)
    return folder


def test_a_folder_of_user_files_is_refused_and_left_as_is(tmp_path: Path) -> None:
    folder = user_files(tmp_path / "projects")
    before = snapshot(folder)
    for create in (True, False):
        with pytest.raises(CacheFolderError, match=r"holds files the cache did not make .*notes\.txt"):
            CacheRoot(folder, create=create)
    assert snapshot(folder) == before


@pytest.mark.parametrize("kind", ["file", "link", "world-writable", "group-writable"])
def test_an_unusable_root_is_refused_naming_it(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "cache"
    if kind == "file":
        path.write_text("")
    elif kind == "link":
        (tmp_path / "real").mkdir()
        path.symlink_to(tmp_path / "real")
    else:
        path.mkdir()
        path.chmod(0o777 if kind == "world-writable" else 0o770)
    with pytest.raises(CacheFolderError, match=f"'{path}'"):
        CacheRoot(path)


def test_a_missing_root_is_created_private_and_cache_list_creates_nothing(tmp_path: Path) -> None:
    os.umask(0o022)
    root = CacheRoot(tmp_path / "new")
    assert oct(os.stat(tmp_path / "new").st_mode & 0o777) == "0o700"
    run = root.create_run({"purpose": "training"})
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in run.path.iterdir()} == {
        "about.json": "0o600",
        "in-use.lock": "0o600",
    }
    run.remove()
    root.close()
    with pytest.raises(FileNotFoundError):
        CacheRoot(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()


def test_only_unused_folders_with_a_record_are_removed(tmp_path: Path) -> None:
    root = CacheRoot(tmp_path)
    in_use = root.create_run({"purpose": "training"})
    stale = root.create_run({"purpose": "evaluation"})
    foreign = root.create_run({})
    stale.release()  # a killed run: its lock is free
    foreign.release()
    (foreign.path / "mine.txt").write_text("a user's file")
    nameless = tmp_path / "tsfc-00000000000000aa"
    nameless.mkdir()
    (nameless / "about.json").write_text("not json")
    assert sorted(root.sweep()) == [stale.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".tsfc-budget.lock", in_use.name, f".tsfc-trash-{foreign.name[5:]}", nameless.name]
    )
    assert (tmp_path / f".tsfc-trash-{foreign.name[5:]}" / "mine.txt").read_text() == "a user's file"
    assert (nameless / "about.json").read_text() == "not json"
    in_use.remove()


def test_a_folder_renamed_after_its_lock_was_taken_is_not_removed(tmp_path: Path, monkeypatch) -> None:
    """M4: between the remover's lock and its rename, the name comes to hold another, in-use folder."""
    root = CacheRoot(tmp_path)
    old = root.create_run({"purpose": "training"})
    old.release()
    name = old.name
    real_lock = run_folder._lock
    swapped = {}

    def lock_then_swap(descriptor: int, exclusive: bool, wait: bool = False) -> bool:
        taken = real_lock(descriptor, exclusive, wait)
        if exclusive and not wait and not swapped:  # the remover holds the old folder's lock now
            os.rename(tmp_path / name, tmp_path / "tsfc-ffffffffffffffff")
            other = CacheRoot(tmp_path)
            swapped["run"] = run_folder.RunFolder(other, name, {"purpose": "training"})  # in use, same name
        return taken

    monkeypatch.setattr(run_folder, "_lock", lock_then_swap)
    assert not root.remove_if_unused(name)
    monkeypatch.undo()
    assert (tmp_path / name / "in-use.lock").exists()
    assert [usage.in_use for usage in root.usage() if usage.name == name] == [True]
    swapped["run"].remove()


def test_trash_of_a_killed_removal_is_counted_and_collected(tmp_path: Path) -> None:
    root = CacheRoot(tmp_path)
    run = root.create_run({"purpose": "training"})
    (run.path / "rank0.bin").write_bytes(b"x" * 5000)
    run.release()
    trash = tmp_path / f".tsfc-trash-{run.name[5:]}"
    os.rename(run.path, trash)  # killed between rename and unlink
    assert root.used_bytes() >= 5000
    assert [usage.name for usage in root.usage()] == [trash.name]
    root.create_run({"purpose": "training"}).remove()  # a run's start collects it
    assert not trash.exists()


def test_a_start_failing_on_a_full_disk_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """L3: the folder, its lock and a half-written record are all gone after the failure."""
    root = CacheRoot(tmp_path)

    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_folder.os, "write", full)
    descriptors = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="No space"):
        root.create_run({"purpose": "training"})
    monkeypatch.undo()
    assert set(os.listdir("/proc/self/fd")) <= descriptors
    assert [path.name for path in tmp_path.iterdir()] == [".tsfc-budget.lock"]


def test_records_that_do_not_parse_are_not_the_caches(tmp_path: Path) -> None:
    root = CacheRoot(tmp_path)
    run = root.create_run({"purpose": "training"})
    record = json.loads((run.path / "about.json").read_text())
    assert record["format"] == run_folder.FORMAT and record["pid"] == os.getpid()
    for damaged in (b"[" * 3000 + b"]" * 3000, b'{"format": 1}', b"{" + b" " * 5000 + b"}", b"\xff"):
        (run.path / "about.json").write_bytes(damaged)
        assert run_folder.read_about(run.fd) is None
    run.remove()
