"""Evaluation features computed once per fit: every validation and the following test reuse them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from anomalib_transformer_student.apps.demo_data import DEFECT_TYPES, DemoDatasetSpec, generate_demo_dataset

from ...factories import TeacherCalls, make_datamodule, make_engine, small_model

N_TRAIN, N_GOOD, N_PER_DEFECT = 4, 2, 1
N_EVAL = N_GOOD + N_PER_DEFECT * len(DEFECT_TYPES)
EPOCHS = 3


class PredictionRecorder(Callback):
    """Scores and maps of every test image, by path."""

    def __init__(self) -> None:
        self.predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for path, score, anomaly_map in zip(outputs.image_path, outputs.pred_score, outputs.anomaly_map, strict=True):
            self.predictions[path] = (score.detach().clone(), anomaly_map.detach().clone())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = DemoDatasetSpec(
        categories=("brick",), image_size=64, n_train=N_TRAIN, n_test_good=N_GOOD, n_test_per_defect=N_PER_DEFECT
    )
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), spec)


def fit_and_test(
    dataset: Path, root: Path, evaluation_cache: bool = True, **model_arguments
) -> tuple[int, int, dict[str, float], PredictionRecorder]:
    """``Engine.fit`` (validation every epoch) then ``Engine.test`` on the same data (MVTec AD: val = test).

    Returns the images the teacher saw in the fit and in the test, the test metrics and predictions.
    """
    seed_everything(0)
    model = small_model(layers=(0, 1), **model_arguments)
    if not evaluation_cache:
        model.feature_caching.evaluation.enabled = False
    teacher = TeacherCalls(model)
    datamodule = make_datamodule(dataset)
    predictions = PredictionRecorder()
    engine = make_engine(root, max_epochs=EPOCHS, check_val_every_n_epoch=1, callbacks=[predictions])
    engine.fit(model, datamodule=datamodule)
    fit_images = teacher.images
    (metrics,) = engine.test(model, datamodule=datamodule)
    assert model.feature_caching.evaluation.cache is None  # released after the test
    return fit_images, teacher.images - fit_images, metrics, predictions


def test_teacher_runs_once_per_image_across_validations_and_test(dataset: Path, tmp_path: Path) -> None:
    fit_images, test_images, metrics, predictions = fit_and_test(
        dataset, tmp_path / "cached", feature_cache={"dir": str(tmp_path / "cache"), "dtype": "float32"}
    )
    # Once per training image (first epoch) and once per evaluation image (first validation); none in the test.
    assert (fit_images, test_images) == (N_TRAIN + N_EVAL, 0)

    reference_fit, reference_test, reference_metrics, reference_predictions = fit_and_test(
        dataset, tmp_path / "fresh", feature_cache=False
    )
    assert (reference_fit, reference_test) == (EPOCHS * (N_TRAIN + N_EVAL), N_EVAL)
    assert metrics.keys() == reference_metrics.keys()
    for name, value in reference_metrics.items():
        assert metrics[name] == pytest.approx(value, abs=1e-5), name
    assert predictions.predictions.keys() == reference_predictions.predictions.keys()
    assert len(predictions.predictions) == N_EVAL
    for path, (score, anomaly_map) in reference_predictions.predictions.items():
        torch.testing.assert_close(predictions.predictions[path][0], score, atol=1e-5, rtol=0)
        torch.testing.assert_close(predictions.predictions[path][1], anomaly_map, atol=1e-5, rtol=0)


def test_evaluation_cache_off_recomputes_every_evaluation(dataset: Path, tmp_path: Path) -> None:
    # The training cache alone: the teacher runs on every evaluation image at every validation and the test.
    fit_images, test_images, _, _ = fit_and_test(
        dataset, tmp_path, evaluation_cache=False, feature_cache={"dir": str(tmp_path / "cache"), "dtype": "float32"}
    )
    assert (fit_images, test_images) == (N_TRAIN + EPOCHS * N_EVAL, N_EVAL)
