"""The exported model judges the pixels validation judged: labels and normalised maps as ``engine.predict`` gives them.

Images are shrunk 4x on their way to the teacher (224-px images to a 56-px input; 224-px tiles of 448-px
images to 56 px), where an unantialiased resize would show the teacher other pixels than the antialiased
one of validation, and the thresholds that validation wrote into the graph would no longer fit.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from anomalib.deploy import OpenVINOInferencer
from lightning.pytorch import seed_everything

from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset

from ...factories import make_datamodule, make_engine, small_model

pytestmark = pytest.mark.slow

TEACHER_SIDE = 56
FP32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.mark.parametrize(
    ("image_side", "tiling", "input_size"),
    [(224, {}, None), (448, {"tiling": {"tile_size": 224}}, (448, 448))],
    ids=["whole-image-dynamic-graph", "tiled-fixed-graph"],
)
def test_openvino_labels_and_maps_equal_engine_predict_after_a_4x_shrink(
    image_side: int, tiling: dict, input_size: tuple[int, int] | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes its cache into the working directory
    spec = DemoDatasetSpec(categories=("brick",), image_size=image_side, n_train=4, n_test_good=2, n_test_per_defect=1)
    root = generate_demo_dataset(tmp_path / "data", spec)
    datamodule = make_datamodule(root)
    seed_everything(0)
    model = small_model(image_size=TEACHER_SIDE, layers=(0, 1), lr=1e-3, **tiling)
    engine = make_engine(tmp_path / "results", max_epochs=2)
    engine.fit(model, datamodule=datamodule)
    # Unseen images: none of their scores is one of the validation scores that set the thresholds, where a
    # rounding difference would decide the label.
    unseen = generate_demo_dataset(tmp_path / "unseen", replace(spec, n_test_good=3, n_test_per_defect=2, seed=1))
    unseen_data = make_datamodule(unseen)
    predicted = [item for batch in engine.predict(model, datamodule=unseen_data) for item in batch]
    assert len(predicted) == 9
    # Both labels occur: a threshold that means something.
    assert len({bool(item.pred_label) for item in predicted}) == 2

    path = model.to_openvino(tmp_path / "export", input_size=input_size)
    inferencer = OpenVINOInferencer(path, device="CPU", config=FP32)
    for item in predicted:
        exported = inferencer.predict(item.image_path)
        exported_map = np.asarray(exported.anomaly_map, dtype=np.float32).squeeze()
        expected_map = item.anomaly_map.squeeze().numpy()
        assert exported_map.shape == expected_map.shape == (image_side, image_side)
        np.testing.assert_allclose(exported_map, expected_map, atol=1e-3, rtol=0)
        np.testing.assert_allclose(np.asarray(exported.pred_score).squeeze(), float(item.pred_score), atol=1e-3)
        assert bool(np.asarray(exported.pred_label).squeeze()) == bool(item.pred_label)
