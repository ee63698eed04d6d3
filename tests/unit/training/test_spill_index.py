"""Adding an entry costs the same at any size of the index, and readers take in only what was added."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from anomalib_transformer_student.training import spill_file
from anomalib_transformer_student.training.feature_cache import TeacherFeatureCache, feature_fingerprint

FINGERPRINT = feature_fingerprint({"teacher": "fake"})


def small_cache(root: Path) -> TeacherFeatureCache:
    return TeacherFeatureCache(root, FINGERPRINT, dtype=torch.float32, memory_budget_mb=0)


def written_bytes() -> int:
    """Bytes this process has passed to write calls so far (Linux)."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))


def test_each_entry_appends_one_line(tmp_path: Path) -> None:
    if not Path("/proc/self/io").exists():
        pytest.skip("counting written bytes needs Linux's /proc/self/io")
    writer = small_cache(tmp_path)
    entry = torch.zeros(2, 2, 2)  # 32 bytes
    index = os.stat(writer.spill.index_path).st_ino
    before = written_bytes()
    for number in range(2000):
        writer.put(f"{number:032x}", entry)
    per_entry = (written_bytes() - before) / 2000
    # Its data and one line, never the whole index again (which would be ~60 kB per entry on average here).
    assert per_entry < 32 + 200
    assert len(writer.spill.index_path.read_text().splitlines()) == 2001
    assert os.stat(writer.spill.index_path).st_ino == index
    writer.close()


def test_a_reader_takes_in_only_the_new_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = small_cache(tmp_path)
    for number in range(500):
        writer.put(f"{number:032x}", torch.full((2, 2, 2), float(number)))
    reader = small_cache(tmp_path)
    (other,) = reader.others
    assert len(other.entries) == 500
    read: list[int] = []
    pread = os.pread
    monkeypatch.setattr(spill_file.os, "pread", lambda fd, size, offset: read.append(size) or pread(fd, size, offset))
    writer.put("new", torch.full((2, 2, 2), -1.0))
    assert reader.get("new") is None
    reader.refresh_others()
    monkeypatch.undo()
    assert read == [len(f"new 500 {other.entries['new'][1]}\n")]
    torch.testing.assert_close(reader.get("new"), torch.full((2, 2, 2), -1.0))
    reader.close()
    writer.close()


def test_an_index_with_many_stale_lines_is_compacted_by_its_next_owner(tmp_path: Path) -> None:
    writer = small_cache(tmp_path)
    for _ in range(3):
        for number in range(100):
            writer.put(f"{number:032x}", torch.full((2, 2, 2), float(number)))  # the same keys again
    lines = len(writer.spill.index_path.read_text().splitlines())
    writer.close()
    assert lines == 301
    adopted = small_cache(tmp_path)
    assert len(adopted.spill.index_path.read_text().splitlines()) == 101
    torch.testing.assert_close(adopted.get(f"{7:032x}"), torch.full((2, 2, 2), 7.0))
    assert len(adopted.spill.entries) == 100
    adopted.close()
