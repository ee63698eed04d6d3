"""NaN or Inf in the teacher's features stops training at the first batch, naming the likely cause."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from safetensors.torch import save_file

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.numerics import NonFiniteFeaturesError, check_finite_features
from anomalib_transformer_student.teacher import create_backbone

from ..conftest import SMALL_TEACHER

FINITE = torch.zeros(2, 4, 8)


def test_finite_features_pass() -> None:
    check_finite_features(FINITE, torch.randn(2, 4, 8))


@pytest.mark.parametrize(("value", "counts"), [(float("nan"), "3 NaN and 0 Inf"), (float("inf"), "0 NaN and 3 Inf")])
def test_non_finite_features_are_counted_per_layer(value: float, counts: str) -> None:
    deep = FINITE.clone()
    deep[0, 0, :3] = value
    with pytest.raises(NonFiniteFeaturesError) as error:
        check_finite_features(FINITE, deep)
    message = str(error.value)
    assert "shallow layer: 0 NaN and 0 Inf of 64 values" in message
    assert f"deep layer: {counts} of 64 values" in message


def test_cause_non_finite_images() -> None:
    images = torch.zeros(1, 3, 4, 4)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteFeaturesError, match="input images already hold 1 NaN"):
        check_finite_features(FINITE / 0, FINITE, images=images, teacher=torch.nn.Linear(2, 2))


def test_cause_broken_weights_names_tensor_and_source() -> None:
    teacher = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        teacher[1].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteFeaturesError) as error:
        check_finite_features(
            FINITE / 0, FINITE, images=torch.zeros(1), teacher=teacher, weights_source="/models/teacher.safetensors"
        )
    message = str(error.value)
    assert "weights themselves hold NaN or Inf (in 1.weight)" in message
    assert "/models/teacher.safetensors" in message
    assert "broken or corrupt" in message


def test_cause_float16_overflow() -> None:
    with pytest.raises(NonFiniteFeaturesError, match=r"float16 overflow.*bfloat16"):
        check_finite_features(FINITE / 0, FINITE, teacher=torch.nn.Linear(2, 2), teacher_precision="float16")


def test_cause_weights_of_another_model() -> None:
    with pytest.raises(NonFiniteFeaturesError, match="do not suit this architecture"):
        check_finite_features(FINITE / 0, FINITE, teacher=torch.nn.Linear(2, 2), weights_source="/w.pth")


def test_broken_weights_file_stops_training_at_the_first_batch(demo_root: Path, tmp_path: Path) -> None:
    """A weights file with a NaN (a bad download) fails at the first batch, naming the file and the tensor."""
    state = create_backbone(SMALL_TEACHER).state_dict()
    state["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    weights = tmp_path / "teacher.safetensors"
    save_file(state, weights)
    model = TransformerStudent(
        teacher=SMALL_TEACHER, teacher_weights=str(weights), image_size=56, layers=(1, 3), feature_cache=False
    )
    datamodule = MVTecAD(root=demo_root, category="brick", num_workers=0, train_batch_size=4, eval_batch_size=4)
    engine = Engine(max_epochs=3, default_root_dir=tmp_path / "results", logger=False, enable_progress_bar=False)
    with pytest.raises(NonFiniteFeaturesError) as error:
        engine.fit(model, datamodule=datamodule)
    message = str(error.value)
    assert re.search(r"shallow layer: \d+ NaN", message)
    assert "blocks.1.mlp.fc1.weight" in message
    assert str(weights) in message
    assert engine.trainer.global_step == 0  # stopped before the first optimiser step
    assert all(torch.isfinite(parameter).all() for parameter in model.model.forward_student.parameters())
