"""The teacher-feature cache: hits and misses, budgets, spill files, keys, damaged files, shared folders, full disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from anomalib.data.transforms import SquarePad
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.model.pre_processing import OriginalSizePreProcessor
from anomalib_transformer_student.training import feature_cache, spill_file
from anomalib_transformer_student.training.cache_folder import folder_bytes
from anomalib_transformer_student.training.feature_cache import (
    ImageKeys,
    TeacherFeatureCache,
    feature_fingerprint,
    image_key,
)

from ...factories import small_model
from ...helpers import listed_keys

TOKENS, WIDTH = 16, 8
ENTRY_BYTES = 2 * TOKENS * WIDTH * 2  # one float16 entry
ENTRY_MB = ENTRY_BYTES / 2**20
FINGERPRINT = feature_fingerprint({"teacher": "fake"})


class CountingTeacher:
    """Deterministic stand-in for the teacher that records how many images it saw."""

    def __init__(self) -> None:
        self.images_seen = 0

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.images_seen += len(images)
        tokens = images.flatten(1)[:, : TOKENS * WIDTH].reshape(len(images), TOKENS, WIDTH)
        return tokens, -2 * tokens


def batch(seeds: list[int]) -> torch.Tensor:
    return torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(seed)) for seed in seeds])


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 0.0), (torch.float16, 1e-3)])
def test_only_missing_entries_are_computed(tmp_path: Path, dtype: torch.dtype, tolerance: float) -> None:
    teacher = CountingTeacher()
    cache = TeacherFeatureCache(tmp_path, FINGERPRINT, dtype=dtype)
    expected_shallow, expected_deep = teacher(batch([0, 1, 2, 3]))
    teacher.images_seen = 0

    cache.tokens(["a", "b"], batch([0, 1]), teacher)
    assert teacher.images_seen == 2
    # A shuffled batch with two known and two new images: only the new ones reach the teacher.
    shallow, deep = cache.tokens(["c", "b", "d", "a"], batch([2, 1, 3, 0]), teacher)
    assert teacher.images_seen == 4
    assert (cache.hits, cache.misses, len(cache)) == (2, 4, 4)
    order = [2, 1, 3, 0]
    torch.testing.assert_close(shallow, expected_shallow[order], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(deep, expected_deep[order], atol=2 * tolerance, rtol=tolerance)
    assert shallow.dtype == torch.float32

    shallow, _ = cache.tokens(["d", "c"], batch([3, 2]), teacher)
    assert teacher.images_seen == 4
    torch.testing.assert_close(shallow, expected_shallow[[3, 2]], atol=tolerance, rtol=tolerance)


def test_images_without_key_are_never_cached(tmp_path: Path) -> None:
    teacher = CountingTeacher()
    cache = TeacherFeatureCache(tmp_path, FINGERPRINT)
    for _ in range(2):
        cache.tokens([None, "a"], batch([0, 1]), teacher)
    assert teacher.images_seen == 3
    assert len(cache) == 1


def test_entries_beyond_the_memory_budget_spill_to_disk(tmp_path: Path) -> None:
    teacher = CountingTeacher()
    cache = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=2.5 * ENTRY_MB)
    expected, _ = teacher(batch(list(range(5))))
    cache.tokens(list("abcde"), batch(list(range(5))), teacher)
    assert (len(cache), cache.disk_entries) == (5, 3)
    assert cache.spill.data_path.stat().st_size >= 3 * 2 * TOKENS * WIDTH * 2
    shallow, _ = cache.tokens(list("edcba"), batch([4, 3, 2, 1, 0]), teacher)
    assert teacher.images_seen == 10
    torch.testing.assert_close(shallow, expected.flip(0), atol=1e-3, rtol=1e-3)


def test_disk_entries_are_reused_only_under_the_same_fingerprint(tmp_path: Path) -> None:
    teacher = CountingTeacher()
    first = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    first.tokens(["a", "b"], batch([0, 1]), teacher)
    first.close()

    again = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    again.tokens(["a", "b"], batch([0, 1]), teacher)
    assert teacher.images_seen == 2

    other = TeacherFeatureCache(tmp_path, feature_fingerprint({"teacher": "other"}), memory_budget_mb=0)
    other.tokens(["a", "b"], batch([0, 1]), teacher)
    assert teacher.images_seen == 4


def _truncate_data(cache: TeacherFeatureCache) -> None:
    path = cache.spill.data_path
    os.truncate(path, path.stat().st_size // 3)


def _flip_bytes(cache: TeacherFeatureCache) -> None:
    with cache.spill.data_path.open("r+b") as data:
        data.seek(5)
        data.write(b"\xff\xfe\xfd\xfc")


def _cut_index(cache: TeacherFeatureCache) -> None:
    text = cache.spill.index_path.read_text()
    cache.spill.index_path.write_text(text[: len(text) // 2])


def _drop_index(cache: TeacherFeatureCache) -> None:
    cache.spill.index_path.unlink()


@pytest.mark.parametrize("damage", [_truncate_data, _flip_bytes, _cut_index, _drop_index])
def test_a_half_written_cache_is_rebuilt_never_read(tmp_path: Path, damage) -> None:
    teacher = CountingTeacher()
    cache = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    cache.tokens(["a", "b", "c"], batch([0, 1, 2]), teacher)
    cache.close()
    damage(cache)
    # Garbage that would be served if the damage went unnoticed.
    expected, _ = teacher(batch([0, 1, 2]))
    teacher.images_seen = 0

    rebuilt = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    shallow, _ = rebuilt.tokens(["a", "b", "c"], batch([0, 1, 2]), teacher)
    assert teacher.images_seen >= 1
    torch.testing.assert_close(shallow, expected, atol=1e-3, rtol=1e-3)
    rebuilt.close()

    # The rebuilt files are whole again: a third run reads everything from them.
    teacher.images_seen = 0
    final = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    shallow, _ = final.tokens(["a", "b", "c"], batch([0, 1, 2]), teacher)
    assert teacher.images_seen == 0
    torch.testing.assert_close(shallow, expected, atol=1e-3, rtol=1e-3)
    assert json.loads(final.spill.index_path.read_text().splitlines()[0])["fingerprint"] == FINGERPRINT


def test_an_unusable_folder_is_named_in_the_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=r"a_file"):
        TeacherFeatureCache(blocker / "cache", FINGERPRINT)
    TeacherFeatureCache(tmp_path / "new" / "cache", FINGERPRINT).close()
    assert (tmp_path / "new" / "cache").is_dir()


def test_image_key_follows_the_content_only(tmp_path: Path) -> None:
    image = tmp_path / "000.png"
    image.write_bytes(b"12345")
    key = image_key(image)
    assert key == image_key(str(image))

    # The same bytes elsewhere (a moved or copied dataset) keep the key, and so does a touch.
    copy = tmp_path / "moved" / "000.png"
    copy.parent.mkdir()
    copy.write_bytes(b"12345")
    assert image_key(copy) == key
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert image_key(image) == key

    # Other bytes of the same size, with the old modification time restored (as tar, rsync -t or cp -p
    # do): path, size and time cannot tell it from the old image, the content does.
    before = image.stat()
    image.write_bytes(b"54321")
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = image.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert image_key(image) != key
    assert image_key(tmp_path / "missing.png") is None


def test_image_keys_hash_each_file_once_until_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "000.png"
    image.write_bytes(b"12345")
    reads: list[object] = []
    monkeypatch.setattr(feature_cache, "image_key", lambda path: reads.append(path) or image_key(path))
    keys = ImageKeys()
    old = keys(image)
    assert keys(image) == old == image_key(image)
    assert len(reads) == 1

    # A rewrite that restores size and modification time still changes the change time, which
    # moves in coarse ticks (a few ms): wait one out, so that the rewrite falls in a later tick.
    time.sleep(0.05)
    before = image.stat()
    image.write_bytes(b"54321")
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert keys(image) == image_key(image) != old
    assert len(reads) == 2
    assert keys(tmp_path / "missing.png") is None


def test_two_caches_open_at_once_write_only_their_own_files_and_find_each_others_entries(tmp_path: Path) -> None:
    """Keys are image contents, so an entry another process wrote is the right one; each writes only its file."""
    teacher = CountingTeacher()
    first = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    second = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    assert (first.spill.data_path.name, second.spill.data_path.name) == ("rank0.bin", "rank0-1.bin")
    first_expected, second_expected = teacher(batch([0, 1]))[0], teacher(batch([2, 3]))[0]
    teacher.images_seen = 0
    for _ in range(2):  # the second round comes from the files
        shallow, _ = first.tokens(["a", "b"], batch([0, 1]), teacher)
        torch.testing.assert_close(shallow, first_expected, atol=1e-3, rtol=1e-3)
        shallow, _ = second.tokens(["c", "d"], batch([2, 3]), teacher)
        torch.testing.assert_close(shallow, second_expected, atol=1e-3, rtol=1e-3)
    # The second finds what the first computed meanwhile (it re-reads the other indexes on a miss).
    shallow, _ = second.tokens(["a", "b"], batch([0, 1]), teacher)
    torch.testing.assert_close(shallow, first_expected, atol=1e-3, rtol=1e-3)
    assert teacher.images_seen == 4  # nothing computed twice
    assert (set(first.spill.entries), set(second.spill.entries)) == ({"a", "b"}, {"c", "d"})
    first.close()
    second.close()


def test_a_finished_caches_file_is_adopted_by_the_next_cache(tmp_path: Path) -> None:
    teacher = CountingTeacher()
    first = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    expected, _ = teacher(batch([0, 1, 2]))
    first.tokens(["a", "b"], batch([0, 1]), teacher)
    first.close()

    teacher.images_seen = 0
    second = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    assert second.spill.data_path == first.spill.data_path
    shallow, _ = second.tokens(["a", "b", "c"], batch([0, 1, 2]), teacher)
    assert teacher.images_seen == 1
    torch.testing.assert_close(shallow, expected, atol=1e-3, rtol=1e-3)
    second.close()
    # Sequential runs fill one file.
    assert [path.name for path in second.folder.glob("*.bin")] == ["rank0.bin"]


def test_a_running_caches_entries_are_checked_on_every_read(tmp_path: Path) -> None:
    teacher = CountingTeacher()
    running = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    running.tokens(["a", "b"], batch([0, 1]), teacher)
    expected, _ = teacher(batch([0, 1]))

    teacher.images_seen = 0
    reader = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    assert reader.spill.data_path != running.spill.data_path
    shallow, _ = reader.tokens(["a", "b"], batch([0, 1]), teacher)
    assert teacher.images_seen == 0  # read from the running cache's file
    torch.testing.assert_close(shallow, expected, atol=1e-3, rtol=1e-3)

    # The running cache's process writes another entry over the slot of "a" (as it may, after a failed checksum).
    with running.spill.data_path.open("r+b") as data:
        data.write(bytes(range(256)) * (ENTRY_BYTES // 256))
    shallow, _ = reader.tokens(["a", "b"], batch([0, 1]), teacher)
    assert teacher.images_seen == 1
    torch.testing.assert_close(shallow, expected, atol=1e-3, rtol=1e-3)
    assert set(reader.spill.entries) == {"a"}  # now in the reader's own file
    reader.close()
    running.close()


def test_the_disk_budget_bounds_the_spill_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    teacher = CountingTeacher()
    budget_mb = 3 * ENTRY_MB  # the index takes room too: two entries fit, not three
    cache = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0, disk_budget_mb=budget_mb)
    expected, _ = teacher(batch(list(range(5))))
    teacher.images_seen = 0
    with caplog.at_level(logging.WARNING, logger="anomalib_transformer_student"):
        for _ in range(2):
            shallow, _ = cache.tokens(list("abcde"), batch(list(range(5))), teacher)
            torch.testing.assert_close(shallow, expected, atol=1e-3, rtol=1e-3)
    assert cache.disk_entries == 2
    assert teacher.images_seen == 5 + 3  # the entries beyond the budget are computed every epoch
    assert folder_bytes(cache.folder) <= budget_mb * 2**20
    (warning,) = caplog.records
    assert f"disk budget of {budget_mb:g} MB is reached" in warning.getMessage()
    assert str(cache.folder) in warning.getMessage()
    assert "feature_cache.disk_budget_mb" in warning.getMessage()
    assert f"MB on disk in {cache.folder} (budget {budget_mb:g} MB for {tmp_path})" in cache.summary()
    cache.close()


def test_a_full_disk_stops_spilling_not_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write = spill_file._write_at
    writes: list[int] = []

    def fill_up(file, offset: int, data: memoryview) -> None:
        writes.append(offset)
        if len(writes) == 5:  # the disk fills up halfway through the third entry (data, then index line, each)
            write(file, offset, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        write(file, offset, data)

    monkeypatch.setattr(spill_file, "_write_at", fill_up)
    teacher = CountingTeacher()
    cache = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    expected, _ = teacher(batch(list(range(5))))
    teacher.images_seen = 0
    with caplog.at_level(logging.WARNING, logger="anomalib_transformer_student"):
        for _ in range(2):
            shallow, _ = cache.tokens(list("abcde"), batch(list(range(5))), teacher)
            torch.testing.assert_close(shallow, expected, atol=1e-3, rtol=1e-3)
    assert teacher.images_seen == 5 + 3
    assert len(writes) == 5  # no write is tried after the disk was found full
    (warning,) = caplog.records
    assert f"the disk of {cache.folder} is full" in warning.getMessage()
    assert f"{ENTRY_MB:.1f} MB needed per image" in warning.getMessage()
    # Neither the index nor the data file keep anything of the failed entry.
    assert listed_keys(cache.spill.index_path) == {"a", "b"}
    assert cache.spill.data_path.stat().st_size == 2 * ENTRY_BYTES
    cache.close()

    teacher.images_seen = 0
    again = TeacherFeatureCache(tmp_path, FINGERPRINT, memory_budget_mb=0)
    shallow, _ = again.tokens(list("abc"), batch([0, 1, 2]), teacher)
    assert teacher.images_seen == 1
    torch.testing.assert_close(shallow, expected[:3], atol=1e-3, rtol=1e-3)
    again.close()


def _model(**overrides) -> TransformerStudent:
    return small_model(**overrides)


def _copy_weights(source: TransformerStudent, target: TransformerStudent) -> None:
    """Give ``target`` the teacher weights of ``source`` wherever the shapes agree."""
    target_state = target.model.teacher.state_dict()
    for name, value in source.model.teacher.state_dict().items():
        if name in target_state and target_state[name].shape == value.shape:
            target_state[name].copy_(value)


def _fingerprint(model: TransformerStudent, augmentations: object = None) -> str:
    caching = model.feature_caching
    digest = caching.weights_digest(model.model.teacher)
    return caching.training.fingerprint_of(digest, model.feature_caching.feature_identity(model), augmentations)


def test_every_part_of_the_fingerprint_matters() -> None:
    torch.manual_seed(0)
    base = _model()
    fingerprint = _fingerprint(base)
    assert _fingerprint(_model()) != fingerprint  # other random weights

    twin = _model()
    _copy_weights(base, twin)
    assert _fingerprint(twin) == fingerprint

    bilinear = Compose(
        [
            Compose([SquarePad(), Resize((56, 56), interpolation=InterpolationMode.BILINEAR)]),
            Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    variants = {
        "teacher name (weight tag)": _model(teacher="vit_small_patch14_dinov2.lvd142m"),
        "layers": _model(layers=(5, 11)),
        "image size": _model(image_size=70),
        "pre-processing": _model(pre_processor=OriginalSizePreProcessor(bilinear)),
        "teacher precision": _model(teacher_precision="float16"),
        "cache dtype": _model(feature_cache={"dtype": "float32"}),
    }
    for name, variant in variants.items():
        # The same weights wherever the architecture allows, so that only the named part differs.
        _copy_weights(base, variant)
        assert _fingerprint(variant) != fingerprint, name
    assert _fingerprint(base, "RandomHorizontalFlip(p=0.5)") != fingerprint
