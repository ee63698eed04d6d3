"""Evaluation-feature cache: exact reuse, recomputation of changed images and teachers, when it is off."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.training import teacher_features as features_module
from anomalib_transformer_student.training.teacher_features import CachedTeacherFeatures

from ...factories import TeacherCalls, small_model


def trainer(**datamodule_attributes: object) -> SimpleNamespace:
    """What ``CachedTeacherFeatures.open`` reads of a trainer."""
    datamodule = SimpleNamespace(**datamodule_attributes) if datamodule_attributes else None
    return SimpleNamespace(
        datamodule=datamodule, val_dataloaders=None, test_dataloaders=None, global_rank=0, world_size=1
    )


def write_image(path: Path, seed: int, size: tuple[int, int] = (70, 50)) -> torch.Tensor:
    """Write a random RGB image; return it as the datamodule would (``(3, H, W)`` in [0, 1])."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255


@pytest.fixture
def model(tmp_path: Path) -> tuple[TransformerStudent, TeacherCalls]:
    """A small eval-mode model whose teacher counts the images it sees."""
    torch.manual_seed(0)
    student = small_model(layers=(0, 1), feature_cache={"dir": str(tmp_path / "cache")}).eval()
    return student, TeacherCalls(student)


def open_for(model: TransformerStudent, stage: str = "validate", **datamodule_attributes: object) -> None:
    model.feature_caching.open_stage(trainer(**datamodule_attributes), model, stage)


def assert_same(actual, expected, rows: list[int] | None = None) -> None:
    """Maps and scores agree to 1e-5 (``expected`` restricted to ``rows``)."""
    rows = rows if rows is not None else list(range(len(expected.pred_score)))
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map[rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.pred_score, expected.pred_score[rows], atol=1e-5, rtol=0)


@torch.no_grad()
def test_cached_maps_and_scores_equal_fresh_ones(model, tmp_path: Path) -> None:
    student, seen = model
    paths = [str(tmp_path / f"{index}.png") for index in range(3)]
    images = torch.stack([write_image(Path(path), index) for index, path in enumerate(paths)])
    fresh = student._predict(images)  # no paths: never cached
    open_for(student)
    seen.reset()
    first = student._predict(images[:2], paths[:2])
    assert seen.images == 2
    # A batch mixing cached and new images, in another order: only the new one runs.
    order = [2, 0, 1]
    second = student._predict(images[order], [paths[index] for index in order])
    assert seen.images == 3
    third = student._predict(images, paths)
    assert seen.images == 3
    assert student.feature_caching.evaluation.cache.hits == 5
    assert_same(first, fresh, [0, 1])
    assert_same(second, fresh, order)
    assert_same(third, fresh)
    # The next stage (the test after the fit) keeps the cache: same fingerprint.
    cache = student.feature_caching.evaluation.cache
    open_for(student, "test")
    assert student.feature_caching.evaluation.cache is cache
    student._predict(images, paths)
    assert seen.images == 3
    # forward, the export path, never uses the cache.
    student(images)
    assert seen.images == 6


@torch.no_grad()
def test_changed_image_and_changed_teacher_are_recomputed(model, tmp_path: Path) -> None:
    student, seen = model
    path = tmp_path / "image.png"
    image = write_image(path, 0)[None]
    open_for(student)
    student._predict(image, [str(path)])
    changed = write_image(path, 1)[None]  # same path, new bytes
    seen.reset()
    cached = student._predict(changed, [str(path)])
    assert seen.images == 1
    assert_same(cached, student._predict(changed))
    # A teacher changed in place (a checkpoint loaded into it) gets another fingerprint.
    fingerprint = student.feature_caching.evaluation.fingerprint
    with torch.no_grad():
        next(student.model.teacher.parameters()).add_(1.0)
    open_for(student, "test")
    assert student.feature_caching.evaluation.fingerprint != fingerprint
    seen.reset()
    student._predict(changed, [str(path)])
    assert seen.images == 1


@pytest.mark.parametrize(
    ("enabled", "stage", "augmentations", "cached"),
    [
        (None, "validate", None, True),
        (False, "validate", None, False),
        (None, "predict", None, False),
        (None, "test", "flip", False),  # auto: augmented evaluation images are not cached
        (True, "test", "flip", True),
    ],
)
def test_when_the_cache_is_on(tmp_path: Path, enabled, stage, augmentations, cached) -> None:
    features = CachedTeacherFeatures("evaluation", enabled, cache_dir=tmp_path)
    features.open(trainer(val_augmentations=augmentations, test_augmentations=augmentations), stage, "digest", {})
    assert features.active is cached
    features.close()
    assert features.cache is None


@torch.no_grad()
def test_a_model_with_an_open_cache_pickles_without_it(model, tmp_path: Path) -> None:
    # anomalib's to_torch export saves the whole module, after a fit whose cache is still open.
    student, _ = model
    path = tmp_path / "image.png"
    image = write_image(path, 0)[None]
    open_for(student)
    student._predict(image, [str(path)])
    torch.save({"model": student}, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)["model"]
    assert loaded.feature_caching.evaluation.cache is None
    assert student.feature_caching.evaluation.cache is not None
    assert_same(loaded._predict(image, [str(path)]), student._predict(image))


@pytest.mark.parametrize(("enabled", "level"), [(None, logging.INFO), (True, logging.WARNING)])
def test_the_augmentation_note_comes_once_not_at_every_validation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, enabled, level: int
) -> None:
    features = CachedTeacherFeatures("evaluation", enabled, cache_dir=tmp_path)
    caplog.set_level(logging.INFO, logger=features_module.__name__)
    for _ in range(3):  # three validations of one fit
        features.open(trainer(val_augmentations="flip"), "validate", "digest", {})
    notes = [record.levelno for record in caplog.records if "(flip)" in record.getMessage()]
    assert notes == [level]
    features.close()
