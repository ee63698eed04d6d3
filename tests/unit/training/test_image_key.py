"""`image_key` hashes an image's bytes without holding the whole file in memory."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

from anomalib_transformer_student.training.feature_cache import image_key

FILE_BYTES = 16 << 20


def test_image_key_hashes_a_large_file_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "large_scan.tiff"
    content = os.urandom(1 << 20) * (FILE_BYTES >> 20)
    path.write_bytes(content)
    expected = hashlib.sha256(content).hexdigest()[:32]
    del content

    tracemalloc.start()
    try:
        key = image_key(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert key == expected
    assert peak < FILE_BYTES // 4, f"image_key held {peak / 2**20:.1f} MiB for a {FILE_BYTES >> 20} MiB file"


def test_an_unreadable_file_has_no_key(tmp_path: Path) -> None:
    assert image_key(tmp_path / "missing.png") is None
    assert image_key(tmp_path) is None  # a folder
