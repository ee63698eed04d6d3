"""The cache folder trusts nothing it did not write: links, FIFOs, foreign owners, loose modes, wild index fields."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from anomalib_transformer_student.training import cache_folder, spill_file
from anomalib_transformer_student.training.cache_folder import CacheFolderError, CacheRoot
from anomalib_transformer_student.training.feature_cache import TeacherFeatureCache, feature_fingerprint
from anomalib_transformer_student.training.teacher_features import CachedTeacherFeatures

FINGERPRINT = feature_fingerprint({"teacher": "fake"})
ENTRY = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
OTHER_USER = 65534  # nobody


def cache(root: Path, **arguments) -> TeacherFeatureCache:
    return TeacherFeatureCache(root, FINGERPRINT, memory_budget_mb=0, **arguments)


def give_away(path: Path, uid: int = OTHER_USER, gid: int = -1) -> None:
    try:
        os.chown(path, uid, gid)
    except PermissionError:
        pytest.skip("giving a folder to another user needs root (the CI machine runs as root)")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_folders_and_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        features = cache(tmp_path / "cache", about={"teacher": "fake"})
        features.put("a", ENTRY)
        features.close()
    finally:
        os.umask(previous)
    assert mode(tmp_path / "cache") == 0o700
    assert mode(features.folder) == 0o700
    names = {path.name for path in features.folder.iterdir()}
    assert names == {"about.json", "in-use.lock", "rank0.lock", "rank0.bin", "rank0.log"}
    assert {path.name: mode(path) for path in features.folder.iterdir()} == dict.fromkeys(names, 0o600)


def test_an_own_folder_readable_by_others_is_made_private(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir(mode=0o755)
    os.chmod(tmp_path / "cache", 0o755)  # as older versions left it
    cache(tmp_path / "cache").close()
    assert mode(tmp_path / "cache") == 0o700


@pytest.mark.parametrize("problem", ["writable by others", "another user's"])
def test_an_untrusted_folder_is_refused_unless_shared(tmp_path: Path, problem: str) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    if problem == "writable by others":
        os.chmod(folder, 0o777)
        expected = "writable by other users"
    else:
        give_away(folder)
        expected = "belongs to another user"
    with pytest.raises(CacheFolderError, match=rf"{expected}.*feature_cache.dir.*feature_cache.shared=True"):
        cache(folder)
    assert list(folder.iterdir()) == []  # nothing was written into it
    shared = cache(folder, shared=True)
    shared.put("a", ENTRY)
    assert mode(shared.spill.data_path) == 0o660
    assert mode(shared.folder) == 0o2770
    shared.close()


def test_the_model_turns_caching_off_for_an_untrusted_folder_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    os.chmod(folder, 0o777)
    features = CachedTeacherFeatures("training", cache_dir=folder)
    trainer = type("Trainer", (), {"datamodule": None, "train_dataloader": None, "global_rank": 0, "world_size": 1})
    with caplog.at_level(logging.WARNING, logger="anomalib_transformer_student"):
        features.open(trainer, "fit", "digest", {})
        features.open(trainer, "fit", "digest", {})  # a second start of the same run: no second warning
    assert features.cache is None
    (warning,) = caplog.records
    assert str(folder) in warning.getMessage() and "feature_cache.shared=True" in warning.getMessage()
    images = torch.randn(2, 3, 4, 4)
    shallow, _ = features.tokens(images, ["x.png", "y.png"], lambda x: (x.flatten(2).mT, x.flatten(2).mT))
    torch.testing.assert_close(shallow, images.flatten(2).mT)


def test_a_planted_link_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    features = cache(tmp_path / "cache")
    features.put("a", ENTRY)
    features.close()
    folder = features.folder
    # The next owner compacts an index with a torn last line, through rank0.log.partial: planted as a link.
    with (folder / "rank0.log").open("a") as index:
        index.write("b 1")
    (folder / "rank0.log.partial").symlink_to(victim)
    adopted = cache(tmp_path / "cache")
    assert adopted.spill.name == "rank0"
    torch.testing.assert_close(adopted.get("a"), ENTRY.half())
    adopted.close()
    assert victim.read_text() == "precious"
    assert not (folder / "rank0.log.partial").exists()

    # A data file or index planted as a link is refused (ELOOP), never truncated through.
    for name in ("rank0.bin", "rank0.log"):
        (folder / name).unlink()
        (folder / name).symlink_to(victim)
        with pytest.raises(OSError, match=r"rank0|Too many levels|symbolic"):
            cache(tmp_path / "cache")
        assert victim.read_text() == "precious"
        (folder / name).unlink()


def test_other_files_that_are_fifos_links_or_wild_are_skipped(tmp_path: Path) -> None:
    features = cache(tmp_path / "cache")
    features.put("a", ENTRY)
    folder = features.folder
    os.mkfifo(folder / "rank1.log")  # reading it would hang
    (folder / "rank1.bin").touch()
    (folder / "rank2.log").symlink_to("/dev/zero")
    (folder / "rank2.bin").symlink_to("/dev/zero")
    header = {"format": spill_file.CACHE_FORMAT_VERSION, "fingerprint": FINGERPRINT, "dtype": "torch.float16"}
    (folder / "rank3.bin").write_bytes(b"\0" * 48)
    (folder / "rank3.log").write_text(json.dumps({**header, "entry_shape": [2, 10**9, 10**9]}) + "\nb 0 1\n")
    (folder / "rank4.bin").write_bytes(b"\0" * 48)
    lines = ["b 999999 1", "c -1 1", "d 0 99999999999", "../../e 0 1", "f 0", "g 0 1 2"]
    (folder / "rank4.log").write_text(json.dumps({**header, "entry_shape": [2, 4, 3]}) + "\n" + "\n".join(lines) + "\n")
    started = time.monotonic()
    features.refresh_others()
    assert time.monotonic() - started < 5
    assert features.others == []
    for key in "bcdefg":
        assert features.get(key) is None
    features.close()


def test_the_lock_is_taken_read_only_so_group_members_can_take_it(tmp_path: Path) -> None:
    features = cache(tmp_path / "cache")
    assert fcntl.fcntl(features._lock, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    features.close()


GROUP_MEMBER = """
import os, sys, torch
os.setgroups([int(sys.argv[2])]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[3]))
from anomalib_transformer_student.training.feature_cache import TeacherFeatureCache, feature_fingerprint
cache = TeacherFeatureCache(sys.argv[1], feature_fingerprint({"teacher": "fake"}), memory_budget_mb=0, shared=True)
assert cache.get("a") is not None, "the first user's entry"
cache.put("b", torch.ones(2, 4, 3))
print(cache.spill.name, flush=True)
cache.close()
"""


def test_a_group_shares_one_folder(request: pytest.FixtureRequest) -> None:
    if os.getuid() != 0:
        pytest.skip("acting as a second user of the group needs root (the CI machine runs as root)")
    group = 4321
    root = Path(tempfile.mkdtemp(prefix="shared-cache-", dir="/tmp"))  # pytest's folders are root's alone
    request.addfinalizer(lambda: shutil.rmtree(root))
    os.chown(root, 0, group)
    os.chmod(root, 0o2770)  # as an administrator sets up a group's folder
    os.chown(root, 0, group)
    first = cache(root, shared=True)
    first.put("a", ENTRY)
    first.close()  # a finished run: its rank0 is free to adopt
    command = [sys.executable, "-c", GROUP_MEMBER, str(root), str(group), str(OTHER_USER)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "rank0"  # adopted the first user's file
    again = cache(root, shared=True)
    assert set(again.spill.entries) == {"a", "b"}
    again.close()


def test_a_failing_start_turns_caching_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_space(*_arguments, **_keywords) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    features = CachedTeacherFeatures("evaluation", cache_dir=tmp_path / "cache")
    trainer = type("Trainer", (), {"datamodule": None, "val_dataloaders": None, "global_rank": 0, "world_size": 1})
    monkeypatch.setattr(cache_folder.os, "mkdir", no_space)
    with caplog.at_level(logging.WARNING, logger="anomalib_transformer_student"):
        features.open(trainer, "validate", "digest", {})
    monkeypatch.undo()
    assert features.cache is None and not features.active
    assert "No space left" in caplog.text and str(tmp_path / "cache") in caplog.text
    features.close()  # the next run tries again
    features.open(trainer, "validate", "digest", {})
    assert features.active
    features.close()


def test_a_removed_folder_is_refused_while_in_use_and_reopened_after(tmp_path: Path) -> None:
    root = CacheRoot(tmp_path / "cache")
    folder = root.fingerprint(FINGERPRINT)
    assert not root.remove(folder.name)
    folder.close()
    assert root.remove(folder.name)
    assert root.usage() == []
    again = root.fingerprint(FINGERPRINT)
    assert again.path.is_dir()
    again.close()
    root.close()


def test_private_files_of_a_killed_process_are_reclaimed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = CacheRoot(tmp_path / "cache")
    folder = root.fingerprint(FINGERPRINT)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = spill_file._host()
    stale = f"rank0-p{int(dead.stdout)}-{host}-0123abcd"
    for suffix in (".bin", ".log"):
        (folder.path / (stale + suffix)).write_bytes(b"x")

    def no_locks(*_arguments, **_keywords) -> bool:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(spill_file, "_lock", no_locks)
    name, lock = spill_file.claim_spill_name(folder)
    assert lock is None and name.startswith(f"rank0-p{os.getpid()}-")
    assert not (folder.path / (stale + ".bin")).exists()
    folder.close()
    root.close()


def test_a_folder_that_fails_mid_run_stops_spilling_not_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    features = cache(tmp_path / "cache")
    teacher = lambda images: (images.flatten(2).mT, -images.flatten(2).mT)  # noqa: E731
    images = torch.rand(3, 3, 4, 4)
    features.tokens(["a"], images[:1], teacher)

    def gone(*_arguments, **_keywords) -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    # The folder can no longer be listed (removed, or its file system gone) while the fit runs.
    monkeypatch.setattr(cache_folder.CacheRoot, "usage", gone)
    monkeypatch.setattr(cache_folder.FingerprintFolder, "names", gone)
    features.RECOUNT_EVERY = 1
    with caplog.at_level(logging.WARNING, logger="anomalib_transformer_student"):
        for _ in range(2):
            shallow, _ = features.tokens(["a", "b", "c"], images, teacher)
            torch.testing.assert_close(shallow, images.flatten(2).mT, atol=1e-3, rtol=0)
    (warning,) = caplog.records
    assert "cannot be read" in warning.getMessage() and str(tmp_path / "cache") in warning.getMessage()
    monkeypatch.undo()
    features.close()
