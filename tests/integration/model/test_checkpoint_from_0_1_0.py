"""A checkpoint written by version 0.1.0, before the package was split into subpackages, still loads and predicts."""

from __future__ import annotations

from pathlib import Path

import torch
from anomalib.data import ImageBatch

from anomalib_transformer_student import TransformerStudent

DATA = Path(__file__).parents[2] / "data"


def test_checkpoint_of_0_1_0_gives_the_same_maps_and_scores() -> None:
    model = TransformerStudent.load_from_checkpoint(DATA / "checkpoint_0.1.0.ckpt").eval()
    expected = torch.load(DATA / "checkpoint_0.1.0_outputs.pt", weights_only=True)
    image = expected["image"]
    with torch.no_grad():
        actual = model(image)
        raw = model._predict(image)
    torch.testing.assert_close(raw.pred_score, expected["raw_pred_score"], rtol=0, atol=1e-5)
    torch.testing.assert_close(raw.anomaly_map, expected["raw_anomaly_map"], rtol=0, atol=1e-5)
    # The exported path now resizes with antialiasing as validation does (0.1.0's export transform did not): its
    # output is the validation path's, post-processed with the checkpoint's statistics and thresholds.
    normalised = model.post_processor(raw)
    torch.testing.assert_close(actual.pred_score, normalised.pred_score, rtol=0, atol=1e-6)
    torch.testing.assert_close(actual.anomaly_map, normalised.anomaly_map, rtol=0, atol=1e-6)
    assert not torch.allclose(actual.anomaly_map, expected["anomaly_map"], atol=1e-3)  # 0.1.0's unaliased export


def test_checkpoint_of_0_1_0_runs_an_evaluation_step() -> None:
    model = TransformerStudent.load_from_checkpoint(DATA / "checkpoint_0.1.0.ckpt").eval()
    batch = ImageBatch(image=torch.rand(1, 3, 40, 60), gt_label=torch.tensor([0]))
    with torch.no_grad():
        output = model.test_step(batch)
    assert output.anomaly_map.shape[-2:] == (40, 60)
    assert torch.isfinite(output.pred_score).all()
