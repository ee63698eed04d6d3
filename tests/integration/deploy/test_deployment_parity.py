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
from anomalib.data import MVTecAD
from anomalib.deploy import OpenVINOInferencer
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset

from ...helpers import SMALL_TEACHER

pytestmark = pytest.mark.slow

TEACHER_SIDE = 56
FP32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.mark.parametrize(
    ("image_side", "tiling", "input_size"),
    [(224, {}, None), (448, {"tile_size": 224}, (448, 448))],
    ids=["whole-image-dynamic-graph", "tiled-fixed-graph"],
)
def test_openvino_labels_and_maps_equal_engine_predict_after_a_4x_shrink(
    image_side: int, tiling: dict, input_size: tuple[int, int] | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes its cache into the working directory
    spec = DemoDatasetSpec(categories=("brick",), image_size=image_side, n_train=4, n_test_good=2, n_test_per_defect=1)
    root = generate_demo_dataset(tmp_path / "data", spec)
    datamodule = MVTecAD(root=root, category="brick", train_batch_size=4, eval_batch_size=4, num_workers=0)
    seed_everything(0)
    model = TransformerStudent(
        teacher=SMALL_TEACHER, pretrained=False, image_size=TEACHER_SIDE, layers=(0, 1), lr=1e-3, **tiling
    )
    engine = Engine(max_epochs=2, default_root_dir=tmp_path / "results", logger=False, accelerator="cpu", devices=1)
    engine.fit(model, datamodule=datamodule)
    # Unseen images: none of their scores is one of the validation scores that set the thresholds, where a
    # rounding difference would decide the label.
    unseen = generate_demo_dataset(tmp_path / "unseen", replace(spec, n_test_good=3, n_test_per_defect=2, seed=1))
    unseen_data = MVTecAD(root=unseen, category="brick", eval_batch_size=4, num_workers=0)
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
