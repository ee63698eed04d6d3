"""One disk budget for the whole cache folder, least recently used features evicted; `transformer-student cache`."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

from anomalib_transformer_student.apps.cli import main
from anomalib_transformer_student.training.cache_folder import IN_USE, CacheRoot
from anomalib_transformer_student.training.feature_cache import TeacherFeatureCache, feature_fingerprint

ENTRY = torch.zeros(2, 64, 32)  # 8 KiB in float32
ENTRY_MB = ENTRY.numel() * 4 / 2**20
DAY = 86400


def fill(root: Path, teacher: str, entries: int, days_ago: float, **arguments) -> TeacherFeatureCache:
    """A closed cache of ``entries`` entries for ``teacher``, last used ``days_ago``."""
    cache = TeacherFeatureCache(
        root,
        feature_fingerprint({"teacher": teacher}),
        dtype=torch.float32,
        memory_budget_mb=0,
        about={"teacher": teacher, "image_size": 224},
        **arguments,
    )
    for number in range(entries):
        cache.put(f"{teacher}{number}", ENTRY)
    cache.close()
    stamp = time.time() - days_ago * DAY
    os.utime(cache.folder / IN_USE, (stamp, stamp))
    return cache


def test_the_least_recently_used_features_make_room(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    oldest = fill(tmp_path, "oldest", 4, days_ago=30)
    older = fill(tmp_path, "older", 4, days_ago=10)
    recent = fill(tmp_path, "recent", 4, days_ago=1)
    budget_mb = 14 * ENTRY_MB  # room for the three above and two more entries: not for four
    with caplog.at_level(logging.WARNING, logger="anomalib_transformer_student"):
        newest = fill(tmp_path, "newest", 4, days_ago=0, disk_budget_mb=budget_mb)
    assert not oldest.folder.exists()  # evicted first
    assert older.folder.exists() and recent.folder.exists()
    assert len(newest.spill.entries) == 4
    assert CacheRoot(tmp_path).total_bytes() <= budget_mb * 2**20
    assert caplog.records == []


def test_features_in_use_are_never_evicted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    oldest = fill(tmp_path, "oldest", 4, days_ago=30)
    running = TeacherFeatureCache(tmp_path, feature_fingerprint({"teacher": "running"}), memory_budget_mb=0)
    running.put("a", ENTRY)
    os.utime(running.folder / IN_USE, (0, 0))  # used long ago, but open now
    budget_mb = 4 * ENTRY_MB  # the running cache keeps its share: not all four new entries fit
    with caplog.at_level(logging.WARNING, logger="anomalib_transformer_student"):
        newest = fill(tmp_path, "newest", 4, days_ago=0, disk_budget_mb=budget_mb)
    assert not oldest.folder.exists()
    assert running.get("a") is not None and running.folder.exists()
    assert 0 < len(newest.spill.entries) < 4
    (warning,) = caplog.records
    assert "disk budget" in warning.getMessage() and "transformer-student cache list" in warning.getMessage()
    running.close()


def test_cache_list_and_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = fill(tmp_path, "old_teacher", 2, days_ago=40)
    fresh = fill(tmp_path, "fresh_teacher", 3, days_ago=0)
    running = TeacherFeatureCache(tmp_path, feature_fingerprint({"teacher": "running"}), memory_budget_mb=0)
    os.utime(running.folder / IN_USE, (0, 0))

    assert main(["cache", "list", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    rows = [
        line for line in listing.splitlines() if line[:16] in {old.folder.name, fresh.folder.name, running.folder.name}
    ]
    assert [row[:16] for row in rows] == [running.folder.name, old.folder.name, fresh.folder.name]  # LRU first
    assert "in use" in rows[0] and "unused" in rows[1]
    assert "teacher old_teacher" in rows[1] and "image_size 224" in rows[1]
    assert f"{3 * ENTRY_MB:.1f}" in rows[2]

    assert main(["cache", "clear", "--older-than", "30", "--cache-dir", str(tmp_path)]) == 0
    assert "Removed 1 folders" in capsys.readouterr().out
    assert not old.folder.exists() and fresh.folder.exists() and running.folder.exists()
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert not fresh.folder.exists() and running.folder.exists()  # in use: kept
    running.put("b", ENTRY)  # and still working
    assert running.get("b") is not None
    running.close()


def test_cache_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "list", "--older-than", "3", "--cache-dir", str(tmp_path)]) == 2
    assert "--older-than" in capsys.readouterr().err
    assert main(["cache", "list", "--cache-dir", str(tmp_path / "none")]) == 0
    assert "No teacher-feature cache" in capsys.readouterr().out
