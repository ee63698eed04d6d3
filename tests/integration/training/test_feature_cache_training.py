"""Training through anomalib's Engine with the teacher-feature cache on, off, misconfigured, and on a full disk."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from PIL import Image
from torchvision.transforms.v2 import RandomHorizontalFlip

from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset
from anomalib_transformer_student.training import spill_file
from anomalib_transformer_student.training.cache_folder import CacheRoot

from ...factories import TeacherCalls, make_datamodule, make_engine, small_model

N_TRAIN = 8


class LossRecorder(Callback):
    """Every training step's loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = DemoDatasetSpec(categories=("brick",), image_size=64, n_train=N_TRAIN, n_test_good=1, n_test_per_defect=1)
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), spec)


def train(
    dataset: Path,
    root: Path,
    epochs: int = 3,
    augmentations: object = None,
    recorder: LossRecorder | None = None,
    **model_arguments,
) -> tuple[list[float], int]:
    """Fit a small model; return the loss of every step and how many images the teacher saw."""
    seed_everything(0)
    model = small_model(**model_arguments)
    teacher = TeacherCalls(model)
    datamodule = make_datamodule(dataset, train_augmentations=augmentations)
    recorder = recorder or LossRecorder()
    engine = make_engine(root, max_epochs=epochs, callbacks=[recorder], limit_val_batches=0)
    engine.fit(model, datamodule=datamodule)
    return recorder.losses, teacher.images


@pytest.fixture(scope="module")
def uncached_two_epochs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The loss of every step of a 2-epoch fit without the cache: the reference of the tests that only read it."""
    losses, _ = train(dataset, tmp_path_factory.mktemp("uncached"), epochs=2, feature_cache=False)
    return losses


def test_cached_training_follows_the_uncached_loss_curve(dataset: Path, tmp_path: Path) -> None:
    reference, reference_images = train(dataset, tmp_path, feature_cache=False)
    assert len(reference) == 3 * N_TRAIN // 4
    assert reference_images == 3 * N_TRAIN
    for dtype, tolerance in (("float32", 1e-5), ("float16", 1e-3)):
        losses, images = train(dataset, tmp_path, feature_cache={"dir": str(tmp_path / dtype), "dtype": dtype})
        # The teacher ran in the first epoch only.
        assert images == N_TRAIN, dtype
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), atol=tolerance, rtol=0)
    # The students did learn, so that agreeing curves are not two flat lines.
    assert reference[-1] < reference[0]


def test_spilled_features_are_reused_by_the_next_run(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arguments = {"feature_cache": {"dir": str(tmp_path / "cache"), "memory_budget_mb": 0}}
    first, first_images = train(dataset, tmp_path, epochs=2, **arguments)
    with caplog.at_level(logging.INFO, logger="anomalib_transformer_student"):
        second, second_images = train(dataset, tmp_path, epochs=2, **arguments)
    assert (first_images, second_images) == (N_TRAIN, 0)
    torch.testing.assert_close(torch.tensor(second), torch.tensor(first), atol=1e-3, rtol=0)
    # The closing summary says how much disk the cache takes.
    (folder,) = (tmp_path / "cache").iterdir()
    assert f"{N_TRAIN} images cached (0 in memory, {N_TRAIN} on disk)" in caplog.text
    assert re.search(rf"\d+\.\d MB on disk in {re.escape(str(folder))} \(budget 20480 MB for ", caplog.text)


def test_a_rewritten_training_image_is_recomputed(dataset: Path, tmp_path: Path) -> None:
    root = shutil.copytree(dataset, tmp_path / "data")
    image = root / "brick" / "train" / "good" / "000.png"
    pixels = np.asarray(Image.open(image))
    # Uncompressed: another picture of the same shape gives a file of the same size in bytes.
    Image.fromarray(pixels).save(image, compress_level=0)
    arguments = {"feature_cache": {"dir": str(tmp_path / "cache"), "memory_budget_mb": 0}}
    _, first_images = train(root, tmp_path, epochs=1, **arguments)

    before = image.stat()
    Image.fromarray(np.ascontiguousarray(pixels[::-1])).save(image, compress_level=0)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = image.stat()
    # Path, size and modification time are those of the old image: only the content tells them apart.
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    _, second_images = train(root, tmp_path, epochs=2, **arguments)
    assert (first_images, second_images) == (N_TRAIN, 1)


def test_a_full_disk_leaves_training_running(
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    uncached_two_epochs: list[float],
) -> None:
    reference = uncached_two_epochs

    def full_disk(*_arguments) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill_file, "_write_at", full_disk)
    with caplog.at_level(logging.WARNING, logger="anomalib_transformer_student"):
        losses, images = train(
            dataset, tmp_path, epochs=2, feature_cache={"dir": str(tmp_path / "cache"), "memory_budget_mb": 0}
        )
    assert images == 2 * N_TRAIN  # nothing cached: the teacher ran every epoch
    # float16 storage rounds the teacher's features whether or not they are cached.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), atol=1e-3, rtol=0)
    (warning,) = [record for record in caplog.records if "Teacher-feature cache" in record.getMessage()]
    assert "is full" in warning.getMessage()
    (folder,) = (tmp_path / "cache").iterdir()
    assert (folder / "rank0.log").stat().st_size == 0
    assert (folder / "rank0.bin").stat().st_size == 0


def test_augmented_training_turns_the_cache_off(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flip = RandomHorizontalFlip(p=0.5)
    with caplog.at_level(logging.INFO, logger="anomalib_transformer_student"):
        _, images = train(dataset, tmp_path, epochs=2, augmentations=flip, feature_cache={"dir": str(tmp_path)})
    assert images == 2 * N_TRAIN
    assert "Teacher-feature cache off for fit: its images are augmented" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="anomalib_transformer_student"):
        _, images = train(
            dataset, tmp_path, epochs=2, augmentations=flip, feature_cache={"enabled": True, "dir": str(tmp_path)}
        )
    assert images == N_TRAIN
    assert "feature_cache=True with fit-time augmentation" in caplog.text


def test_an_unusable_cache_folder_turns_caching_off_with_one_warning(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, uncached_two_epochs: list[float]
) -> None:
    reference = uncached_two_epochs
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="anomalib_transformer_student"):
        losses, images = train(dataset, tmp_path, epochs=2, feature_cache={"dir": str(blocker / "cache")})
    assert images == 2 * N_TRAIN  # the teacher ran every epoch
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), atol=0, rtol=0)
    (warning,) = [record for record in caplog.records if "Teacher-feature cache" in record.getMessage()]
    assert "not_a_folder/cache" in warning.getMessage()
    assert "feature_cache.dir" in warning.getMessage()


class FailAtSecondEpoch(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("a failing fit")


def test_a_failed_fit_releases_its_cache(dataset: Path, tmp_path: Path) -> None:
    seed_everything(0)
    model = small_model(feature_cache={"dir": str(tmp_path / "cache"), "memory_budget_mb": 0})
    datamodule = make_datamodule(dataset)
    engine = make_engine(tmp_path, max_epochs=3, callbacks=[FailAtSecondEpoch()], limit_val_batches=0)
    with pytest.raises(RuntimeError, match="a failing fit"):
        engine.fit(model, datamodule=datamodule)
    assert model.feature_caching.training.cache is None
    assert model.feature_caching.evaluation.cache is None
    # Its lock is free: the next run in this process adopts its spill file (and its entries) instead of a new one.
    (folder,) = (tmp_path / "cache").iterdir()
    name, lock = spill_file.claim_spill_name(CacheRoot(tmp_path / "cache").fingerprint(folder.name))
    assert name == "rank0"
    os.close(lock)
    assert len((folder / "rank0.log").read_text().splitlines()) == 1 + N_TRAIN
