"""The Python API end to end: fit, test, predict, checkpoint round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_transformer_student import TransformerStudent

from ..helpers import SMALL_TEACHER


@pytest.fixture(scope="module")
def fitted(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, TransformerStudent, MVTecAD]:
    torch.manual_seed(0)
    datamodule = MVTecAD(root=demo_root, category="brick", num_workers=0, train_batch_size=4, eval_batch_size=4)
    model = TransformerStudent(teacher=SMALL_TEACHER, pretrained=False, image_size=112)
    engine = Engine(max_epochs=2, default_root_dir=tmp_path_factory.mktemp("api"), logger=False)
    engine.fit(model, datamodule=datamodule)
    return engine, model, datamodule


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
    fresh = TransformerStudent(teacher=SMALL_TEACHER, pretrained=False, image_size=112)
    assert not torch.equal(
        fresh.model.forward_student.layers[0].weight, reloaded.model.forward_student.layers[0].weight
    )
