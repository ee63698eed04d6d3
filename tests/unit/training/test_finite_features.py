"""NaN or Inf in the teacher's features stops training at the first batch, naming the likely cause."""

from __future__ import annotations

import pytest
import torch

from anomalib_transformer_student.training.finite_features import NonFiniteFeaturesError, check_finite_features

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
    with pytest.raises(NonFiniteFeaturesError, match=r"overflow in the teacher \(precision 16-mixed\).*bf16-mixed"):
        check_finite_features(FINITE / 0, FINITE, teacher=torch.nn.Linear(2, 2), precision="16-mixed")


def test_cause_weights_of_another_model() -> None:
    with pytest.raises(NonFiniteFeaturesError, match="do not suit this architecture"):
        check_finite_features(FINITE / 0, FINITE, teacher=torch.nn.Linear(2, 2), weights_source="/w.pth")
