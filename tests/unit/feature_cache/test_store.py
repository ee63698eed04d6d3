"""The store: only missing entries computed, memory then disk, budgets that mean what they say, image keys."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anomalib_transformer_student.feature_cache import spill_file
from anomalib_transformer_student.feature_cache.run_folder import CacheRoot, RunFolder
from anomalib_transformer_student.feature_cache.store import FeatureStore, ImageKeys, image_key


def teacher(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = images.flatten(2).mT
    return tokens, tokens * 2


def store(root: Path, **arguments) -> FeatureStore:
    cache = CacheRoot(root)
    return FeatureStore(cache, cache.create_run({"purpose": "training"}), **arguments)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 0.0), ("float16", 1e-2)])
def test_only_missing_entries_are_computed(tmp_path: Path, dtype: str, tolerance: float) -> None:
    features = store(tmp_path, dtype=dtype)
    images = torch.randn(3, 3, 4, 4)
    calls = []
    counted = lambda x: calls.append(len(x)) or teacher(x)  # noqa: E731
    features.tokens(["a", "b", None], images, counted)
    shallow, deep = features.tokens(["b", "c", "a"], images, counted)
    assert calls == [3, 1]
    torch.testing.assert_close(deep[0], teacher(images[1:2])[1][0], atol=tolerance, rtol=0)
    torch.testing.assert_close(shallow[2], teacher(images[:1])[0][0], atol=tolerance, rtol=0)
    features.close()


def test_entries_beyond_the_memory_budget_go_to_disk_and_the_folder_goes_at_close(tmp_path: Path) -> None:
    features = store(tmp_path, memory_budget_mb=0, dtype="float32")
    images = torch.randn(2, 3, 4, 4)
    features.tokens(["a", "b"], images, teacher)
    assert not features.memory and set(features.spill.entries) == {"a", "b"}
    torch.testing.assert_close(features.get("b")[1], teacher(images)[1][1])
    folder = features.folder.path
    features.close()
    assert not folder.exists()


def test_another_ranks_entries_are_found(tmp_path: Path) -> None:
    root = CacheRoot(tmp_path)
    first = FeatureStore(root, root.create_run({"purpose": "training"}), rank=0, memory_budget_mb=0)
    other_root = CacheRoot(tmp_path)
    second = FeatureStore(
        other_root, RunFolder(other_root, first.folder.name, {}, create=False), rank=1, memory_budget_mb=0
    )
    images = torch.randn(1, 3, 4, 4)
    first.tokens(["a"], images, teacher)
    second.tokens(["a"], images, lambda _: pytest.fail("computed again"))
    assert second.hits == 1
    second.close(remove=False)
    first.close()


@pytest.mark.parametrize("budget_mb", [0, 0.001])
def test_a_budget_of_zero_or_below_an_entry_caches_nothing_and_evicts_nothing(
    tmp_path: Path, budget_mb: float, caplog: pytest.LogCaptureFixture
) -> None:
    """M1: other folders are left as they are."""
    earlier = store(tmp_path, memory_budget_mb=0)
    earlier.tokens(["x"], torch.randn(1, 3, 16, 16), teacher)
    earlier.folder.release()  # a killed run's folder, in use by nobody
    before = sorted(path.name for path in tmp_path.iterdir())
    with caplog.at_level(logging.WARNING):
        features = store(tmp_path, memory_budget_mb=0, disk_budget_mb=budget_mb)
        assert features.root.used_bytes() > 0  # the stale folder is gone only because it was unused, see below
        features.tokens(["a", "b"], torch.randn(2, 3, 16, 16), teacher)
        features.tokens(["c"], torch.randn(1, 3, 16, 16), teacher)
    assert features.spill.entries == {}
    assert caplog.text.count("disk budget") == 1
    features.close()
    after = sorted(path.name for path in tmp_path.iterdir())
    assert set(after) <= set(before)  # nothing new left, nothing evicted to make room


WRITER = """
import os, sys, time, torch
from anomalib_transformer_student.feature_cache.run_folder import CacheRoot, RunFolder
from anomalib_transformer_student.feature_cache.store import FeatureStore
root = CacheRoot(sys.argv[1])
store = FeatureStore(root, root.create_run({"purpose": "training"}), memory_budget_mb=0, disk_budget_mb=1.0,
                     dtype="float32")
def meet(step):  # all three spill at once, and stay until all are done
    open(os.path.join(sys.argv[2], f"{step}{os.getpid()}"), "w").close()
    while len([n for n in os.listdir(sys.argv[2]) if n.startswith(step)]) < 3:
        time.sleep(0.01)
meet("ready")
for index in range(16):
    store.put(f"p{os.getpid()}k{index}", torch.ones(2, 64, 96))  # 48 KiB each
meet("done")
os._exit(0)  # as if killed: the folder stays for the count
"""


def test_the_disk_budget_holds_for_the_folder_across_processes(tmp_path: Path) -> None:
    """M2: three processes spilling at once stay within one 1-MB budget (margin 0: checked under one lock)."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cache, meeting = tmp_path / "cache", tmp_path / "meeting"
    meeting.mkdir()
    command = [sys.executable, "-c", WRITER, str(cache), str(meeting)]
    writers = [subprocess.Popen(command, env=environment) for _ in range(3)]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0, 0]
    root = CacheRoot(cache, create=False)
    entries = sum(path.stat().st_size for path in cache.glob("tsfc-*/rank0.bin")) // (2 * 64 * 96 * 4)
    assert root.used_bytes() <= 2**20
    assert entries >= 15  # the budget was used, not refused: 21 entries fit in 1 MB with the indexes
    assert len(list(cache.glob("tsfc-*"))) == 3
    root.close()


def test_a_full_disk_stops_spilling_with_one_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    features = store(tmp_path, memory_budget_mb=0)

    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill_file.os, "pwrite", full)
    images = torch.randn(3, 3, 4, 4)
    with caplog.at_level(logging.WARNING):
        for key in "abc":
            shallow, _ = features.tokens([key], images[:1], teacher)
    assert caplog.text.count("is full") == 1
    torch.testing.assert_close(shallow, teacher(images[:1])[0].half().float())
    monkeypatch.undo()
    assert features.spill.entries == {} and (features.folder.path / "rank0.log").stat().st_size == 0
    features.close()


def test_image_keys_follow_the_content_and_hash_each_file_once(tmp_path: Path, monkeypatch) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"pixels")
    copy = tmp_path / "b.png"
    copy.write_bytes(b"pixels")
    assert image_key(image) == image_key(copy) == hashlib.sha256(b"pixels").hexdigest()[:32]
    keys, hashed = ImageKeys(), []
    monkeypatch.setattr("anomalib_transformer_student.feature_cache.store.image_key", lambda p: hashed.append(p) or "k")
    keys(image), keys(image)
    image.write_bytes(b"other pixels")
    keys(image)
    assert hashed == [image, image]
    assert keys(tmp_path / "missing.png") is None


def test_another_ranks_damaged_file_is_skipped_with_one_warning(tmp_path: Path, caplog) -> None:
    features = store(tmp_path, memory_budget_mb=0)
    (features.folder.path / "rank1.bin").write_bytes(b"")
    (features.folder.path / "rank1.log").write_bytes(b"[" * 900 + b"]" * 900 + b"\n")
    images = torch.randn(2, 3, 4, 4)
    with caplog.at_level(logging.WARNING):
        for key in "ab":
            shallow, _ = features.tokens([key], images[:1], teacher)
    assert caplog.text.count("skipping rank 1's file") == 1
    torch.testing.assert_close(shallow, teacher(images[:1])[0].half().float())
    features.close()
