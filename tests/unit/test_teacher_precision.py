"""Half-precision teacher: autocast on CUDA with maps close to float32, plain float32 elsewhere."""

from __future__ import annotations

import logging

import pytest
import torch

from anomalib_transformer_student.model.teacher import TeacherFeatureExtractor, create_backbone
from anomalib_transformer_student.model.torch_model import TransformerStudentModel


def model(precision: str, image_size: int = 56) -> TransformerStudentModel:
    torch.manual_seed(0)
    teacher = TeacherFeatureExtractor(create_backbone("vit_small_patch14_dinov2"), (7, 11), image_size)
    return TransformerStudentModel(teacher, teacher_precision=precision).eval()


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match=r"teacher_precision must be one of.*float16"):
        model("half")


def test_half_precision_request_runs_float32_off_cuda(caplog: pytest.LogCaptureFixture) -> None:
    images = torch.rand(2, 3, 56, 56)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        expected = model("float32")(images)
        actual = model("bfloat16")(images)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=0, rtol=0)
    assert "teacher_precision=bfloat16 applies on CUDA only" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half-precision autocast of the teacher needs a CUDA device")
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_half_precision_maps_correlate_with_float32_on_cuda(precision: str) -> None:
    images = torch.rand(4, 3, 448, 448, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        reference = model("float32", 448).cuda()(images)
        half = model(precision, 448).cuda()
        shallow, _ = half.teacher_features(images)
        output = half(images)
    assert shallow.dtype == torch.float32
    pair = torch.stack([output.anomaly_map.flatten(), reference.anomaly_map.flatten()]).double()
    assert torch.corrcoef(pair)[0, 1] >= 0.999
