"""Training through anomalib's Engine with the teacher-feature cache on, off, and misconfigured."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from torchvision.transforms.v2 import RandomHorizontalFlip

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset
from anomalib_transformer_student.training.feature_cache import CacheDirectoryError

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
    model = TransformerStudent(teacher="vit_small_patch14_dinov2", pretrained=False, image_size=56, **model_arguments)
    images_seen = [0]

    def count(_module: torch.nn.Module, inputs: tuple[torch.Tensor], _outputs: object) -> None:
        images_seen[0] += len(inputs[0])

    model.model.teacher.register_forward_hook(count)
    datamodule = MVTecAD(
        root=dataset,
        category="brick",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        train_augmentations=augmentations,
    )
    recorder = recorder or LossRecorder()
    engine = Engine(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        callbacks=[recorder],
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    engine.fit(model, datamodule=datamodule)
    return recorder.losses, images_seen[0]


def test_cached_training_follows_the_uncached_loss_curve(dataset: Path, tmp_path: Path) -> None:
    reference, reference_images = train(dataset, tmp_path, feature_cache=False)
    assert len(reference) == 3 * N_TRAIN // 4
    assert reference_images == 3 * N_TRAIN
    for dtype, tolerance in (("float32", 1e-5), ("float16", 1e-3)):
        losses, images = train(dataset, tmp_path, cache_dir=str(tmp_path / dtype), cache_dtype=dtype)
        # The teacher ran in the first epoch only.
        assert images == N_TRAIN, dtype
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), atol=tolerance, rtol=0)
    # The students did learn, so that agreeing curves are not two flat lines.
    assert reference[-1] < reference[0]


def test_spilled_features_are_reused_by_the_next_run(dataset: Path, tmp_path: Path) -> None:
    arguments = {"cache_dir": str(tmp_path / "cache"), "cache_memory_budget_mb": 0}
    first, first_images = train(dataset, tmp_path, epochs=2, **arguments)
    second, second_images = train(dataset, tmp_path, epochs=2, **arguments)
    assert (first_images, second_images) == (N_TRAIN, 0)
    torch.testing.assert_close(torch.tensor(second), torch.tensor(first), atol=1e-3, rtol=0)


def test_augmented_training_turns_the_cache_off(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flip = RandomHorizontalFlip(p=0.5)
    with caplog.at_level(logging.INFO, logger="anomalib_transformer_student"):
        _, images = train(dataset, tmp_path, epochs=2, augmentations=flip, cache_dir=str(tmp_path))
    assert images == 2 * N_TRAIN
    assert "Teacher-feature cache off: training applies augmentation" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="anomalib_transformer_student"):
        _, images = train(dataset, tmp_path, epochs=2, augmentations=flip, feature_cache=True, cache_dir=str(tmp_path))
    assert images == N_TRAIN
    assert "feature_cache=True with train-time augmentation" in caplog.text


def test_unwritable_cache_folder_stops_before_training(dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    recorder = LossRecorder()
    with pytest.raises(CacheDirectoryError, match="not_a_folder/cache"):
        train(dataset, tmp_path, recorder=recorder, cache_dir=str(blocker / "cache"))
    assert recorder.losses == []
