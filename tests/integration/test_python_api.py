"""The Python API end to end: fit, test, predict, checkpoint round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_transformer_student import TransformerStudent

from ..factories import Trained, small_model


@pytest.fixture
def fitted(trained_small: Trained) -> tuple[Engine, TransformerStudent, MVTecAD]:
    """The session's small model, fitted two epochs with ``Engine.fit`` (``trained_small`` in conftest.py)."""
    return trained_small.engine, trained_small.model, trained_small.datamodule


def test_test_reports_image_and_pixel_auroc(fitted: tuple[Engine, TransformerStudent, MVTecAD]) -> None:
    engine, model, datamodule = fitted
    (results,) = engine.test(model, datamodule=datamodule)
    for key in ("image_AUROC", "pixel_AUROC"):
        assert 0.0 <= results[key] <= 1.0 and not math.isnan(results[key])


def test_predict_gives_maps_scores_and_labels(fitted: tuple[Engine, TransformerStudent, MVTecAD]) -> None:
    engine, model, datamodule = fitted
    batches = engine.predict(model, dataloaders=datamodule.test_dataloader())
    predictions = [item for batch in batches for item in batch]
    assert len(predictions) == len(datamodule.test_data)
    first = predictions[0]
    assert first.anomaly_map.shape[-2:] == (112, 112)
    assert 0.0 <= float(first.pred_score) <= 1.0  # normalised by anomalib's post-processor
    assert first.pred_label is not None


def test_checkpoint_round_trip_gives_same_scores(
    fitted: tuple[Engine, TransformerStudent, MVTecAD], tmp_path: Path
) -> None:
    engine, model, datamodule = fitted
    path = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(path)
    reloaded = TransformerStudent.load_from_checkpoint(path)  # anomalib loads with weights_only=True
    assert bool(reloaded.model.teacher.weights_loaded)
    images = next(iter(datamodule.test_dataloader())).image
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected, actual = model(images), reloaded(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map)
    # Trained students differ from freshly initialised ones, so the comparison is not trivial.
    fresh = small_model(image_size=112)
    assert not torch.equal(
        fresh.model.forward_student.layers[0].weight, reloaded.model.forward_student.layers[0].weight
    )
