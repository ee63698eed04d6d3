"""Half-precision teacher: autocast on CUDA, bf16 on CPUs with bf16 units, a logged float32 fallback elsewhere."""

from __future__ import annotations

import logging

import pytest
import torch

from anomalib_transformer_student.model import torch_model
from anomalib_transformer_student.model.teacher import TeacherFeatureExtractor, create_backbone
from anomalib_transformer_student.model.torch_model import TransformerStudentModel


def model(precision: str, image_size: int = 56) -> TransformerStudentModel:
    torch.manual_seed(0)
    teacher = TeacherFeatureExtractor(create_backbone("vit_small_patch14_dinov2"), (7, 11), image_size)
    return TransformerStudentModel(teacher, teacher_precision=precision).eval()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU with bf16 units, whatever this machine's (PyTorch emulates bf16 where it has none: slower, same maths)."""
    monkeypatch.setattr(torch_model, "cpu_has_bf16_units", lambda: True)


@pytest.fixture
def no_bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without bf16 units (an AVX2-only x86, say), whatever this machine's."""
    monkeypatch.setattr(torch_model, "cpu_features", lambda: frozenset({"avx2", "fma"}))


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match=r"teacher_precision must be one of.*float16"):
        model("half")


@pytest.mark.usefixtures("bf16_cpu")
def test_bfloat16_runs_the_teacher_in_bf16_on_a_cpu_with_bf16_units(caplog: pytest.LogCaptureFixture) -> None:
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    reference, bf16 = model("float32"), model("bfloat16")
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        expected_tokens = reference.teacher_features(images)
        tokens = bf16.teacher_features(images)
        expected, actual = reference(images), bf16(images)
    assert bf16.autocast_dtype(torch.device("cpu")) == torch.bfloat16
    for token, expected_token in zip(tokens, expected_tokens, strict=True):
        assert token.dtype == torch.float32
        error = float((token - expected_token).abs().max() / expected_token.abs().max())
        # bf16 keeps 8 significant bits (relative step 2**-8 = 0.4 %): the error is that size, not float32's 1e-7.
        assert 1e-4 < error < 5e-2
    assert actual.anomaly_map.dtype == torch.float32
    assert pearson(actual.anomaly_map, expected.anomaly_map) >= 0.99
    assert "teacher runs in float32" not in caplog.text


@pytest.mark.usefixtures("no_bf16_cpu")
def test_bfloat16_falls_back_to_float32_with_one_warning_on_a_cpu_without_bf16_units(
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = torch.rand(2, 3, 56, 56)
    bf16 = model("bfloat16")
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        expected = model("float32")(images)
        actual = bf16(images)
        bf16(images)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=0, rtol=0)
    warnings = [record.getMessage() for record in caplog.records if "teacher_precision=bfloat16" in record.getMessage()]
    assert len(warnings) == 1
    assert "no bf16 units" in warnings[0]
    assert "teacher_precision='float32'" in warnings[0]


@pytest.mark.usefixtures("bf16_cpu")
def test_float16_keeps_float32_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    images = torch.rand(2, 3, 56, 56)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        expected = model("float32")(images)
        actual = model("float16")(images)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=0, rtol=0)
    assert "teacher_precision=float16: the teacher runs in float32 on cpu" in caplog.text
    assert "bfloat16" in caplog.text


@pytest.mark.usefixtures("bf16_cpu")
def test_exported_graph_holds_the_float32_teacher() -> None:
    bf16 = model("bfloat16")
    program = torch.export.export(bf16, (torch.rand(1, 3, 56, 56),))
    dtypes = {
        node.meta["val"].dtype
        for node in program.graph.nodes
        if isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].is_floating_point()
    }
    assert dtypes == {torch.float32}


def test_cpu_bf16_units_are_read_from_the_cpu_features(monkeypatch: pytest.MonkeyPatch) -> None:
    for features, expected in [
        ({"avx2", "avx512f", "avx512_vnni"}, False),  # AVX-512 without BF16 (e.g. Ice Lake)
        ({"avx2", "avx512f", "avx512_bf16"}, True),  # AMD Zen 4, Intel Cooper Lake
        ({"avx2", "amx_bf16", "amx_tile"}, True),  # Intel Sapphire Rapids
        ({"asimd", "bf16"}, True),  # Arm Neoverse V1
    ]:
        monkeypatch.setattr(torch_model, "cpu_features", lambda features=features: frozenset(features))
        assert torch_model.cpu_has_bf16_units() is expected


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
    assert pearson(output.anomaly_map, reference.anomaly_map) >= 0.999
