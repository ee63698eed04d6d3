"""The callback in anomalib's Engine: cache on, off, on unusable folders, on a full disk; evaluation features once."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from torchvision.transforms.v2 import RandomHorizontalFlip

from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset
from anomalib_transformer_student.feature_cache import spill_file

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


def test_a_full_disk_leaves_training_running(
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    uncached_two_epochs: list[float],
) -> None:
    reference, cache = uncached_two_epochs, tmp_path / "cache"

    def full_disk(*_arguments) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill_file, "_write_at", full_disk)
    with caplog.at_level(logging.WARNING, logger="anomalib_transformer_student"):
        losses, images = train(dataset, tmp_path, epochs=2, feature_cache={"dir": str(cache), "memory_budget_mb": 0})
    assert images == 2 * N_TRAIN  # nothing cached: the teacher ran every epoch
    # float16 storage rounds the teacher's features whether or not they are cached.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), atol=1e-3, rtol=0)
    (warning,) = [record for record in caplog.records if "Teacher-feature cache" in record.getMessage()]
    assert "is full" in warning.getMessage()
    assert [path.name for path in cache.iterdir()] == [".tsfc-budget.lock"]  # the run's folder went with it


def test_augmented_training_turns_the_cache_off(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flip = RandomHorizontalFlip(p=0.5)
    with caplog.at_level(logging.INFO, logger="anomalib_transformer_student"):
        _, images = train(dataset, tmp_path, epochs=2, augmentations=flip, feature_cache={"dir": str(tmp_path / "c")})
    assert images == 2 * N_TRAIN
    assert "Teacher-feature cache off for fit: its images are augmented" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="anomalib_transformer_student"):
        _, images = train(
            dataset, tmp_path, epochs=2, augmentations=flip, feature_cache={"enabled": True, "dir": str(tmp_path / "c")}
        )
    assert images == N_TRAIN
    assert "feature_cache=True with fit-time augmentation" in caplog.text


def unusable(tmp_path: Path, kind: str) -> Path:
    """A cache folder that is a file, a link, world-writable, another user's, or holding a user's files."""
    path = tmp_path / "cache"
    if kind == "file":
        path.write_text("")
    elif kind == "link":
        (tmp_path / "real").mkdir()
        path.symlink_to(tmp_path / "real")
    else:
        path.mkdir()
        (path / "thesis.tex").write_text("important") if kind == "user files" else None
        path.chmod(0o777 if kind == "world-writable" else 0o755)
        if kind == "another user's":
            os.chown(path, 4242, 4242)
    return path


def state(tmp_path: Path) -> list[tuple[str, int, int, bytes | None]]:
    """Name, mode, owner and bytes of the cache folder and what it holds (or links to)."""
    paths = [tmp_path / "cache", *(tmp_path / "cache").rglob("*"), *tmp_path.glob("real*")]
    return sorted((str(p), p.lstat().st_mode, p.lstat().st_uid, p.read_bytes() if p.is_file() else None) for p in paths)


@pytest.mark.parametrize("kind", ["file", "link", "world-writable", "another user's", "user files"])
def test_an_unusable_cache_folder_turns_caching_off_with_one_warning(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, uncached_two_epochs: list[float], kind: str
) -> None:
    if kind == "another user's" and os.getuid() != 0:
        pytest.skip("needs root to give a folder to another user")
    folder = unusable(tmp_path, kind)
    before = state(tmp_path)
    with caplog.at_level(logging.WARNING, logger="anomalib_transformer_student"):
        losses, images = train(
            dataset, tmp_path / "run", epochs=2, feature_cache={"dir": str(folder), "disk_budget_mb": 0}
        )
    assert images == 2 * N_TRAIN  # the teacher ran every epoch
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(uncached_two_epochs), atol=0, rtol=0)
    (warning,) = [record for record in caplog.records if "Teacher-feature cache" in record.getMessage()]
    assert f"'{folder}'" in warning.getMessage() and "feature_cache.dir" in warning.getMessage()
    assert state(tmp_path) == before


class FailAtSecondEpoch(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("a failing fit")


def test_a_failed_fit_releases_and_removes_its_folders(dataset: Path, tmp_path: Path) -> None:
    seed_everything(0)
    model = small_model(feature_cache={"dir": str(tmp_path / "cache"), "memory_budget_mb": 0})
    datamodule = make_datamodule(dataset)
    engine = make_engine(tmp_path, max_epochs=3, callbacks=[FailAtSecondEpoch()], limit_val_batches=0)
    with pytest.raises(RuntimeError, match="a failing fit"):
        engine.fit(model, datamodule=datamodule)
    assert all(cache.store is None for cache in model.feature_caching._caches.values())
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [".tsfc-budget.lock"]
