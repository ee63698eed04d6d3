"""Spill files: append-only index, readers that take in only new lines, CRC on every read, damage skipped."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomalib_transformer_student.feature_cache.run_folder import CacheRoot, RunFolder, read_about
from anomalib_transformer_student.feature_cache.spill_file import DamagedSpillFile, SpillFile

ENTRY = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)


@pytest.fixture
def run(tmp_path: Path) -> RunFolder:
    folder = CacheRoot(tmp_path).create_run({"purpose": "training"})
    yield folder
    folder.release()


def test_each_entry_appends_one_line_and_a_reader_takes_in_only_new_ones(run: RunFolder) -> None:
    writer = SpillFile(run, 0, "float32", writable=True)
    writer.put("a", ENTRY)
    reader = SpillFile(run, 0, "float32")
    writer.put("b", ENTRY + 1)
    assert (run.path / "rank0.log").read_text().count("\n") == 3  # header and two entries
    assert reader.get("b") is None
    reader.refresh()
    np.testing.assert_array_equal(reader.get("b"), ENTRY + 1)


def test_an_entry_damaged_after_its_first_read_is_never_served(run: RunFolder, caplog) -> None:
    """L4: one's own entries are CRC-checked on every read."""
    spill = SpillFile(run, 0, "float32", writable=True)
    spill.put("a", ENTRY)
    np.testing.assert_array_equal(spill.get("a"), ENTRY)
    with (run.path / "rank0.bin").open("r+b") as data:
        data.seek(5)
        data.write(b"\x7f")
    with caplog.at_level(logging.WARNING):
        assert spill.get("a") is None
    assert "fails its checksum" in caplog.text


def test_a_torn_last_line_waits_for_its_newline(run: RunFolder) -> None:
    writer = SpillFile(run, 0, "float32", writable=True)
    writer.put("a", ENTRY)
    with (run.path / "rank0.log").open("ab") as log:
        log.write(b"b 0 12")
    reader = SpillFile(run, 0, "float32")
    assert set(reader.entries) == {"a"}


GOOD_HEADER = b'{"format": 1, "dtype": "float32", "shape": [2, 3, 4]}'
junk = st.binary(max_size=300) | st.sampled_from(
    [b"[" * 3000 + b"]" * 3000, b"9" * 5000, b'{"format": 1, "dtype": "float32", "shape": [2, 3, 99999999999]}',
     b'{"format": 1, "dtype": "float32", "shape": [2, 3, "4"]}', b'{"format": 1, "dtype": "float32"}', b"{}"]
)  # fmt: skip
lines = st.lists(
    junk
    | st.builds(
        lambda k, s, c: b" ".join((k, s, c)), st.binary(max_size=80), st.binary(max_size=30), st.binary(max_size=30)
    )
    | st.builds(lambda s: b"a " + str(s).encode() + b" 1", st.integers(-(10**30), 10**30)),
    max_size=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=junk | st.just(GOOD_HEADER), body=lines, about=junk)
def test_malformed_headers_lines_and_records_are_skipped_never_fatal(
    header: bytes, body: list[bytes], about: bytes
) -> None:
    """M4 of the issue (M3 of the review): any field that fails to parse or is out of bounds is skipped."""
    with tempfile.TemporaryDirectory() as scratch:
        run = CacheRoot(scratch).create_run({"purpose": "training"})
        (run.path / "rank1.bin").write_bytes(ENTRY.tobytes())
        (run.path / "rank1.log").write_bytes(b"\n".join([header, *body]) + b"\n")
        try:
            reader = SpillFile(run, 1, "float32")
        except DamagedSpillFile:
            assert header != GOOD_HEADER
        else:
            for key in list(reader.entries):
                row = reader.get(key)
                assert row is None or row.shape == (2, 3, 4)
            reader.close()
        (run.path / "about.json").write_bytes(about)
        assert read_about(run.fd) is None
        run.release()
